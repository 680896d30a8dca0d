"""The cross-dataset stage (``study evaluate``): does the answer hold on photos from another collection?

Every finished confirm run's trained model (``confirm/<run>.pt``) captions one split of another Karpathy-format
dataset (COCO, Flickr30k, ``../shared/data/coco-mini``, a ``shapes`` set of another seed) with the confirm
stage's own beam settings (the checkpoint's config), and the captions are scored per image with the full
coco-caption suite against that dataset's raw reference captions, exactly as the confirm stage scores the
test split (``study.trial.evaluation.score_split``). The model's vocabulary only decodes: a reference word the model
never saw in training is still a word of the reference, counted by BLEU, METEOR, ROUGE-L and CIDEr-D as
coco-caption counts it. The verdict is then computed on that set too (``analysis.verdict.compute_verdict``,
paired bootstrap over its images and the seeds), and pooled with the study's own test split
(``analysis.pooled``).

    <study>/evaluate/<name>/set.json          the dataset: JSON, images root, split, fingerprint, images, references
    <study>/evaluate/<name>/runs/<run>.json   one confirm run's scores, per-image scores and captions on it
    <study>/evaluate/<name>/verdict.csv       the verdict table on it
    <study>/evaluate/<name>/stale/            results of an older dataset or checkpoint, set aside

The stage is resumable and idempotent: each run's result is written (write-then-rename) as soon as it is
scored, and a later ``study evaluate`` of the same dataset reuses every result whose dataset fingerprint, split
and checkpoint (sha256) are unchanged. Image features go through the feature cache (``study.data.features``,
under the study dataset's ``cache_dir``), keyed by the evaluated split's fingerprint and the encoder. MLflow's
confirm runs gain the scores as ``<name>/<metric>`` (``StudyTracker.confirm_metrics``).

The stage takes the study's context (``study.context.StudyContext``) and a dataset file; the frames, the
report's sections and the export's files are read back from the folder above by ``study.records.verdicts``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from study.records import missing
from study.records.paths import StudyPaths
from study.records.run_results import (
    ConfirmResult,
    EvaluationResult,
    RecordError,
    read_confirm_results,
    read_evaluation_result,
    write_evaluation_result,
)
from study.records.verdicts import (
    SET_FILE,
    EvaluatedSet,
    EvaluateError,
    load_evaluation,
    read_set,
    result_files,
    set_folder,
    set_verdict,
    verdict_table_of,
    write_set,
)

if TYPE_CHECKING:
    from study.context import StudyContext
    from study.data.prepare import PreparedData
    from study.spec import StudySpec
    from study.tracking import StudyTracker

log = logging.getLogger(__name__)


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # what an MLflow metric prefix and a file name take


@dataclass
class EvaluateOutcome:
    name: str
    folder: Path
    computed: list[str] = field(default_factory=list)  # runs scored in this call
    reused: list[str] = field(default_factory=list)  # runs whose finished result was kept
    verdict: Any = None  # analysis.verdict.Verdict on this set
    report: Path | None = None  # the report, when Study.evaluate rewrote it


def dataset_name(json_path: Path, split: str, name: str | None = None) -> str:
    """``name`` if given (checked), else the JSON's ``dataset`` field (or its file stem without ``dataset_``),
    with ``-<split>`` added for a split other than ``test``; made safe for file and MLflow metric names."""
    if name is not None:
        if not NAME_RE.match(name):
            raise EvaluateError(f"--name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                                "letter or digit (it names a folder and MLflow metrics)")
        return name
    base = None
    try:
        data = json.loads(Path(json_path).read_bytes())
        base = data.get("dataset") if isinstance(data, dict) else None
    except (OSError, ValueError):
        pass  # the loader says what is wrong with the file
    base = str(base or Path(json_path).stem.removeprefix("dataset_"))
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-._") or "dataset"
    return (base if split == "test" else f"{base}-{split}")[:64]


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_split(json_path: Path, images_root: Path | None, split: str):
    """The records of one split of a Karpathy JSON, as a ``CaptionDataset`` holding only them (its fingerprint
    then covers the JSON and that split's images). Every problem is an error naming the file."""
    from study.data.karpathy import SPLITS, load_karpathy

    json_path = Path(json_path).expanduser().resolve()
    if split not in SPLITS:
        raise EvaluateError(f"--split {split!r} is not a split of the Karpathy format; allowed: {', '.join(SPLITS)}")
    if not json_path.is_file():
        raise EvaluateError(f"dataset JSON {json_path} does not exist")
    root = Path(images_root).expanduser().resolve() if images_root is not None else None
    data = load_karpathy(json_path, root, restval="keep")  # DatasetError (a ValueError) names file and entry
    records = tuple(r for r in data.records if r.split == split)
    if not records:
        counts = pd.Series([r.split for r in data.records]).value_counts().to_dict()
        have = ", ".join(f"{s} ({n} images)" for s, n in counts.items()) or "none"
        raise EvaluateError(f"{json_path}: the split {split!r} has no images; its splits: {have} (choose with --split)")
    return replace(data, records=records)


def split_fingerprint(data) -> str:
    """sha256 over the JSON's bytes, the split and each of its images' file name and content: what the scores
    depend on. Unlike ``CaptionDataset.fingerprint`` it does not depend on the images root (``--images-root
    ../shared/data`` and the default root find the same files of coco-mini), so either way reuses the results
    and the features."""
    h = hashlib.sha256(data.json_path.read_bytes())
    h.update(f"\0split\0{data.records[0].split}".encode())
    for record in data.records:
        h.update(f"\0{record.filename}\0{_sha256(record.path)}".encode())
    return h.hexdigest()


def _feature_keys(data) -> list[tuple[str, Path]]:
    """(cache key, path) per image: its file name (the path when names repeat), independent of the root."""
    keys = [r.filename for r in data.records]
    if len(set(keys)) != len(keys):
        keys = [str(r.path) for r in data.records]
    return [(key, r.path) for key, r in zip(keys, data.records)]


def prepare_split(data, *, encoder: str, cache_dir: Path, need_grid: bool, progress: bool,
                  device: str | None = None, fingerprint: str | None = None) -> "PreparedData":
    """The split's features (from the feature cache, computed on first use) as ``PreparedData`` with the one
    split, its raw references and image paths; no token sets (each model brings its own vocabulary)."""
    from study.data.features import extract_features
    from study.data.prepare import PreparedData, SplitImages

    items = _feature_keys(data)
    split = data.records[0].split
    cache = extract_features(items, encoder=encoder, cache_dir=cache_dir,
                             fingerprint=fingerprint or split_fingerprint(data), progress=progress, device=device)
    images = SplitImages(np.arange(len(items), dtype=np.int64), [list(r.captions) for r in data.records],
                         [r.path for r in data.records])
    return PreparedData(name=data.name, pooled=np.asarray(cache.pooled),
                        grid=np.asarray(cache.grid) if need_grid else None, images={split: images},
                        info={"feature_cache": str(cache.path), "feature_cache_reused": cache.reused})


def _to_score(paths, folder: Path, confirm: dict[str, ConfirmResult], fingerprint: str, split: str,
              outcome: EvaluateOutcome) -> list[tuple[str, ConfirmResult, dict]]:
    """(run, its confirm result, its identity) of each run to score; a finished result of the same split and
    checkpoint is reused (``outcome.reused``)."""
    todo = []
    for run, confirmed in confirm.items():
        identity = {"dataset_fingerprint": fingerprint, "split": split,
                    "checkpoint_sha256": _sha256(paths.confirm_model(run))}
        if _reusable(folder, run, identity):
            outcome.reused.append(run)
        else:
            todo.append((run, confirmed, identity))
    return todo


def run_evaluate(ctx: "StudyContext", json_path: Path, *, images_root: Path | None = None, split: str = "test",
                 name: str | None = None, runs: list[str] | None = None, progress: bool = True,
                 device: str | None = None, track: bool = True) -> EvaluateOutcome:
    """Caption and score ``split`` of the dataset ``json_path`` with every finished confirm run of the study
    (``runs``: only these run names) and compute the verdict on it at the report's level; finished results are
    reused (see the module docstring). ``track``: MLflow's confirm runs gain the scores."""

    from study.progress import progress_bar
    from study.records.comparing import read_comparator
    from study.records.decide_log import report_level
    from study.registry import any_needs_grid

    spec, paths = ctx.spec, ctx.paths
    confirm = _confirm_models(spec.name, paths, runs, ctx.command("report"))
    name = dataset_name(json_path, split, name)
    data = load_split(json_path, images_root, split)
    folder = set_folder(paths, name)
    manifest = _check_manifest(folder, name, data, split)
    fingerprint = manifest.fingerprint
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    write_set(folder / SET_FILE, manifest)

    outcome = EvaluateOutcome(name, folder)
    todo = _to_score(paths, folder, confirm, fingerprint, split, outcome)
    if todo:
        methods = [confirmed.config["inject"] for _, confirmed, _ in todo]
        prepared = prepare_split(data, encoder=spec.dataset.encoder, cache_dir=spec.dataset.cache_dir,
                                 need_grid=any_needs_grid(methods), progress=progress, device=device,
                                 fingerprint=fingerprint)
        bar = progress_bar(len(todo), f"evaluate on {name}", unit="run", enabled=progress)
        for run, confirmed, identity in todo:
            result = evaluate_run(paths.confirm_model(run), confirmed, prepared, split, device=device)
            write_evaluation_result(folder / "runs" / f"{run}.json",
                                    EvaluationResult(run=run, dataset=name, **identity, **result))
            outcome.computed.append(run)
            bar.set_postfix_str(run, refresh=False)
            bar.update(1)
        bar.close()
    if track:
        log_evaluation(spec, paths, ctx.tracker(), name)
    per_image, run_frame, _ = load_evaluation(paths, name)
    outcome.verdict = set_verdict(per_image, run_frame, spec=spec, level=report_level(spec, paths),
                                  comparator=read_comparator(paths), set_name=name)
    verdict_table_of(outcome.verdict).to_csv(folder / "verdict.csv", index=False)
    return outcome


def _confirm_models(study: str, paths: StudyPaths, runs: list[str] | None, report: str
                    ) -> dict[str, ConfirmResult]:
    """The finished confirm runs to score (``runs``: only these), by name: their results; each must have its
    trained model beside it."""
    confirm = read_confirm_results(paths)
    if not confirm:
        raise EvaluateError(f"study {study} has no finished confirm runs in {paths.confirm}: `{report}` trains "
                            "them first (evaluate scores the confirm stage's models)")
    if runs is not None:
        unknown = sorted(set(runs) - set(confirm))
        if unknown:
            raise EvaluateError(f"no confirm run {', '.join(unknown)} in {paths.confirm}; it has {', '.join(confirm)}")
        confirm = {r: confirm[r] for r in confirm if r in runs}
    no_model = [str(paths.confirm_model(r)) for r in confirm if not paths.confirm_model(r).is_file()]
    if no_model:
        raise EvaluateError(f"confirm runs without their trained model: {', '.join(no_model)} (written by an older "
                            f"version?); move their .json aside and `{report}` trains them again")
    return confirm


def _check_manifest(folder: Path, name: str, data, split: str) -> EvaluatedSet:
    """The set's ``set.json`` record; refuse a name already used for another file or split."""
    previous = read_set(folder / SET_FILE) if (folder / SET_FILE).is_file() else None
    if previous is not None and (previous.json_path != str(data.json_path) or previous.split != split):
        raise EvaluateError(f"{folder} already holds the evaluation named {name!r}, of {previous.json_path} split "
                            f"{previous.split!r}; this is {data.json_path} split {split!r}: pass --name to "
                            "evaluate it under another name")
    fingerprint = split_fingerprint(data)
    if previous is not None and previous.fingerprint != fingerprint:
        log.warning("%s changed since it was evaluated as %s (another fingerprint): every run is scored again",
                    data.json_path, name)
    return EvaluatedSet(name=name, json=str(data.json_path), images_root=str(data.images_root), split=split,
                        dataset=data.name, fingerprint=fingerprint, images=len(data.records),
                        created_ms=(previous.created_ms if previous else 0) or int(time.time() * 1000),
                        image_paths=[str(r.path) for r in data.records], filenames=[r.filename for r in data.records],
                        references=[list(r.captions) for r in data.records])


def _reusable(folder: Path, run: str, identity: dict[str, str]) -> bool:
    """Whether ``run``'s finished result on this set is for this dataset and checkpoint; an outdated one is set
    aside in ``stale/`` (so it is scored again)."""
    path = folder / "runs" / f"{run}.json"
    if not path.is_file():
        return False
    try:
        stored = read_evaluation_result(path).model_dump()
    except RecordError:  # damaged: set aside and scored again
        stored = {}
    if all(stored.get(k) == v for k, v in identity.items()):
        return True
    (folder / "stale").mkdir(exist_ok=True)
    path.replace(folder / "stale" / path.name)
    log.warning("%s was scored on another version of the dataset or of the checkpoint: set aside in %s and scored "
                "again", path, folder / "stale")
    return False


def evaluate_run(checkpoint: Path, confirm_result: ConfirmResult, data: "PreparedData", split: str, *,
                 device: str | None = None) -> dict[str, Any]:
    """One confirm run's model captions the split with its own beam settings; scores as the confirm stage's."""
    import torch

    from study.config import checkpoint_config
    from study.data.encoders import pick_device
    from study.data.tokens import Vocab
    from study.models import build_captioner
    from study.trial.checkpoints import CheckpointError, load_checkpoint
    from study.trial.evaluation import Decoding, score_split
    from study.trial.inference import checkpoint_encoder

    t0 = time.perf_counter()
    state = load_checkpoint(checkpoint)
    cfg = checkpoint_config(state["config"], f"{checkpoint}: config")
    checkpoint_encoder(state, cfg, checkpoint)  # refuses a model trained on other features than this cache's
    if int(state["feature_dim"]) != data.feature_dim:
        raise CheckpointError(f"{checkpoint} reads {state['feature_dim']}-dim features; {data.info['feature_cache']} "
                              f"holds {data.feature_dim}-dim ones")
    vocab = Vocab.from_dict(state["vocab"])
    model = build_captioner(cfg, len(vocab), int(state["feature_dim"]))
    model.load_state_dict(state["model"])  # feature statistics included: buffers of the train split's
    model = model.to(pick_device(device)).eval()
    with torch.inference_mode():  # the vocabulary only decodes: the references stay raw text
        scored = score_split(model, data, split, vocab=vocab, decoding=Decoding.of(cfg), full=True, per_image=True)
    return {**confirm_result.identity(), "beam_size": cfg.beam_size, "length_penalty": cfg.length_penalty,
            "params": confirm_result.params, "train_seconds": confirm_result.train_seconds,
            "epochs": confirm_result.epochs, "scores": scored.scores, "captions": scored.captions,
            "per_image": {m: {str(k): v for k, v in d.items()} for m, d in scored.per_image.items()},
            "decode_seconds": scored.decode_seconds, "metric_seconds": scored.metric_seconds,
            "seconds": time.perf_counter() - t0}


def log_evaluation(spec: "StudySpec", paths: StudyPaths, tracker: "StudyTracker", name: str) -> int:
    """Each run's scores on the set as metrics ``<name>/<metric>`` of its MLflow confirm run (with its result
    as an artifact under ``evaluate/<name>``); the confirm runs are logged first where they are not yet. Each
    result is journalled once (by its identity). Returns how many were new."""
    from study.tracking import log_confirm_runs

    log_confirm_runs(spec, paths, tracker)
    new = 0
    for path in result_files(paths, name):
        result = read_evaluation_result(path)
        metrics = {f"{name}/{k}": v for k, v in result.scores.items() if not missing(v)}
        tag = f"{name}/{path.stem}/{result.dataset_fingerprint[:16]}/{result.checkpoint_sha256[:16]}"
        new += tracker.confirm_metrics(path.stem, metrics, tag=tag, artifacts=[path],
                                       artifact_path=f"evaluate/{name}")
    return new
