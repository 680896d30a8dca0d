"""Every test set's verdict, read back from what the stages wrote: each set ``study evaluate`` scored (its frames
and verdict), the verdict pooled over every test set, the report's sections and the export's files. A library
under the report, export and evaluate stages, not a stage: it imports none (``tests/test_architecture.py``).
The stage that scores a set is ``study.stages.evaluate``; scoring one model is ``study.trial.evaluation``.

    <study>/evaluate/<name>/set.json          the dataset: JSON, images root, split, fingerprint, images, references
    <study>/evaluate/<name>/runs/<run>.json   one confirm run's scores, per-image scores and captions on it
    <study>/evaluate/<name>/verdict.csv       the verdict table on it
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from study.records.decide_log import report_level
from study.records.files import atomic_write_json
from study.records.paths import StudyPaths
from study.records.run_results import read_evaluation_result, read_record

if TYPE_CHECKING:
    from study.spec import StudySpec

SET_FILE = "set.json"
GALLERY_IMAGES = 6


class EvaluatedSet(BaseModel):
    """``set.json``: the dataset a study was evaluated on, as ``study evaluate`` read it."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    json_path: str = Field(alias="json")  # the dataset JSON, resolved
    images_root: str
    split: str
    dataset: str
    fingerprint: str  # the split's (``study.data``): a changed file is scored again
    images: int
    created_ms: int = 0  # when first evaluated: orders the sets
    image_paths: list[str]
    filenames: list[str] = []
    references: list[list[str]]  # each image's human captions


class EvaluateError(ValueError):
    """``study evaluate`` cannot run as asked, or was not run on a set asked for; the message names what and where."""


def set_folder(paths: StudyPaths, name: str) -> Path:
    return paths.evaluate / name


def evaluated_sets(paths: StudyPaths) -> list[str]:
    """The names of the datasets this study was evaluated on, in the order they were first evaluated."""
    root = paths.evaluate
    if not root.is_dir():
        return []
    found = [(read_set(d / SET_FILE).created_ms, d.name) for d in root.iterdir() if (d / SET_FILE).is_file()]
    return [name for _, name in sorted(found)]


def result_files(paths: StudyPaths, name: str) -> list[Path]:
    return sorted((set_folder(paths, name) / "runs").glob("*.json"))


def study_test_name(spec: "StudySpec") -> str:
    """How the report names the study's own test split among the pooled sets
    (``study.records.comparing.test_set_name``)."""
    from study.records.comparing import test_set_name

    return test_set_name(spec)


def read_set(path: Path) -> EvaluatedSet:
    return read_record(EvaluatedSet, path, "move its folder aside and `study evaluate` scores the set again",
                       what="evaluated set")


def write_set(path: Path, evaluated: EvaluatedSet) -> Path:
    return atomic_write_json(path, evaluated.model_dump(mode="json", by_alias=True), indent=1)


def read_manifest(paths: StudyPaths, name: str) -> EvaluatedSet:
    path = set_folder(paths, name) / SET_FILE
    if not path.is_file():
        have = ", ".join(evaluated_sets(paths)) or "none"
        raise EvaluateError(f"study {paths.root.name} was not evaluated on {name!r} (no {path}); evaluated: {have}")
    return read_set(path)


def load_evaluation(paths: StudyPaths, name: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(per_image, runs, gallery) of one evaluated set, the frames ``study.records.load_confirm`` gives for the
    test split (same columns and metric names, the same per-image reader), so ``compute_verdict`` reads them
    unchanged."""
    manifest = read_manifest(paths, name)
    image_rows, run_rows, gallery_rows = [], [], []
    for path in result_files(paths, name):
        result = read_evaluation_result(path)
        image_rows += result.per_image_rows()
        run_rows.append({"dataset": name, "run": path.stem, **result.identity(), "params": result.params,
                         "train_seconds": result.train_seconds, "epochs": result.epochs, "seconds": result.seconds,
                         "images": len(result.captions), "distinct_captions": len(set(result.captions)),
                         **result.scores})
        if result.config_rank == 1 and result.seed == 0:
            gallery_rows += [{"image_path": image_path, "method": result.method, "caption": caption,
                              "reference": references[0]} for image_path, caption, references
                             in zip(manifest.image_paths[:GALLERY_IMAGES], result.captions, manifest.references)]
    return pd.DataFrame(image_rows), pd.DataFrame(run_rows), pd.DataFrame(gallery_rows)


def set_verdict(per_image: pd.DataFrame, runs: pd.DataFrame, *, spec: "StudySpec", level: float = 0.95,
                comparator: str | None = None, set_name: str):
    """``analysis.verdict.compute_verdict`` on one evaluated set (``set_name``: its name, which keys its image
    resample), with the study's arms' roles and its fixed ``comparator`` (``study.records.comparing``). A set on
    which every
    caption scores 0 decides nothing."""
    from analysis.verdict import compute_verdict
    from study.records.comparing import BOOT_SEED, N_BOOT

    verdict = compute_verdict(per_image, runs, roles=spec.arm_set.roles(), margin=spec.confirm.equivalence_margin,
                              level=level, n_boot=N_BOOT, seed=BOOT_SEED, comparator=comparator, set_name=set_name)
    scores = per_image[verdict.metric] if verdict.metric in per_image else None
    if verdict.best_other is not None and scores is not None and not (scores.fillna(0) != 0).any():
        # Every caption scored 0 (e.g. references sharing no word with the models' vocabulary): "competes ...
        # 0.0 [0.0, 0.0]" would be a decision from nothing (issue 33, item 9).
        import dataclasses
        import math

        from analysis.verdict import NOT_AVAILABLE

        verdict = dataclasses.replace(
            verdict, verdict=NOT_AVAILABLE, diff=math.nan, ci=(math.nan, math.nan), best_other=None,
            text=f"Every caption of every method scores 0 {verdict.metric} on this set, so it cannot decide anything "
                 "(do its references share words with the models' vocabulary?).")
    return verdict


def pooled(paths: StudyPaths, spec: "StudySpec", test_per_image: pd.DataFrame, *, level: float = 0.95):
    """``analysis.pooled.pooled_verdict`` over the study's test split and every evaluated set (the study's own
    test split evaluated again, the same JSON and split, is not counted twice)."""
    from analysis.pooled import pooled_verdict
    from study.records.comparing import BOOT_SEED, N_BOOT, read_comparator

    sets = {study_test_name(spec): test_per_image}
    own = str(Path(spec.dataset.json_path).resolve()) if spec.dataset.kind == "karpathy" else None
    for name in evaluated_sets(paths):
        manifest = read_manifest(paths, name)
        if manifest.json_path == own and manifest.split == "test":
            continue
        sets[name] = load_evaluation(paths, name)[0]
    return pooled_verdict(sets, roles=spec.arm_set.roles(), margin=spec.confirm.equivalence_margin, level=level,
                          n_boot=N_BOOT, seed=BOOT_SEED, comparator=read_comparator(paths))


def split_fingerprints(paths: StudyPaths, spec: "StudySpec", info: dict[str, Any]) -> dict[str, str]:
    """The test splits this study scored, by name: the study's own (the dataset's fingerprint, from the prepared
    data's ``info``) first, then each evaluated set (its split's fingerprint)."""
    out = {study_test_name(spec): str(info.get("dataset_fingerprint", ""))}
    out.update({name: read_manifest(paths, name).fingerprint for name in evaluated_sets(paths)})
    return out


def verdict_table_of(verdict) -> pd.DataFrame:
    """One set's verdict table as ``verdict.csv`` holds it: one row per method, its level beside it."""
    table = verdict.table.rename_axis("method").reset_index()
    if "level" not in table:
        table.insert(min(2, len(table.columns)), "level", verdict.level)
    return table


def evaluations_frame(paths: StudyPaths) -> pd.DataFrame:
    """``Study.evaluations``: one row per evaluated set and confirm run: ``dataset, run, method, config_rank, seed``,
    the corpus scores on that set (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE), ``images, distinct_captions``."""
    from study.records.reader_types import with_reader_types

    frames = [load_evaluation(paths, name)[1] for name in evaluated_sets(paths)]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=["dataset", "run", "method", "config_rank", "seed"])
    return with_reader_types(pd.concat(frames, ignore_index=True))


def evaluation_per_image_frame(paths: StudyPaths, name: str | None = None) -> pd.DataFrame:
    """``Study.evaluation_per_image``: one row per set, confirm run and image (``dataset`` first)."""
    from study.records.reader_types import with_reader_types

    names = [name] if name is not None else evaluated_sets(paths)
    frames = [load_evaluation(paths, n)[0].assign(dataset=n) for n in names]
    frames = [f[["dataset", *[c for c in f.columns if c != "dataset"]]] for f in frames if not f.empty]
    return with_reader_types(pd.concat(frames, ignore_index=True)) if frames else pd.DataFrame(
        columns=["dataset", "method", "config_rank", "seed", "image_id"])


def verdict_frame(paths: StudyPaths, spec: "StudySpec", name: str) -> pd.DataFrame:
    """``Study.evaluation_verdict``: the verdict table on one set, shaped as ``Study.verdict``'s (words in attrs)."""
    from study.records.comparing import read_comparator
    from study.records.reader_types import with_reader_types

    per_image, runs, _ = load_evaluation(paths, name)
    verdict = set_verdict(per_image, runs, spec=spec, level=report_level(spec, paths),
                          comparator=read_comparator(paths), set_name=name)
    table = with_reader_types(verdict.table)
    table.attrs.update(dataset=name, verdict=verdict.verdict, diff=verdict.diff, ci=verdict.ci,
                       best_other=verdict.best_other, margin=verdict.margin, level=verdict.level, text=verdict.text)
    return table


def pooled_frame(paths: StudyPaths, spec: "StudySpec", test_per_image: pd.DataFrame) -> pd.DataFrame:
    """``Study.pooled_verdict``: one row per test set (``set``: difference, interval, weight, its own word) and a
    last row ``pooled``; attrs: ``verdict``, ``decides``, ``diff``, ``ci``, ``other``, ``q``, ``q_p``, ``text``."""
    verdict = pooled(paths, spec, test_per_image, level=report_level(spec, paths))
    table = verdict.sets.copy()
    if len(table):
        table.loc["pooled"] = {"images": int(table["images"].sum()), "seeds": int(table["seeds"].min()),
                               "diff": verdict.diff, "lo": verdict.ci[0], "hi": verdict.ci[1],
                               "se": float(np.nanstd(verdict.boot)), "weight": 1.0, "verdict": verdict.verdict}
    table = table.rename_axis("set").reset_index()
    table.attrs.update(verdict=verdict.verdict, decides=verdict.decides, diff=verdict.diff, ci=verdict.ci,
                       other=verdict.other, target=verdict.target, q=verdict.q, q_p=verdict.q_p,
                       disagree=verdict.disagree, level=verdict.level, text=verdict.text)
    return table


def export_frames(paths: StudyPaths, spec: "StudySpec", test_per_image: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The files ``study export`` adds for the evaluated sets (none when the study was never evaluated):
    ``evaluations.csv`` (every run's scores on every set), ``evaluation_verdicts.csv`` (each set's verdict table,
    ``dataset`` first) and ``pooled_verdict.csv``."""
    names = evaluated_sets(paths)
    if not names:
        return {}
    verdicts = [verdict_frame(paths, spec, n).rename_axis("method").reset_index().assign(dataset=n) for n in names]
    verdicts = pd.concat([v[["dataset", *[c for c in v.columns if c != "dataset"]]] for v in verdicts],
                         ignore_index=True)
    return {"evaluations.csv": evaluations_frame(paths), "evaluation_verdicts.csv": verdicts,
            "pooled_verdict.csv": pooled_frame(paths, spec, test_per_image)}


def evaluated_verdicts(paths: StudyPaths, spec: "StudySpec", *, level: float) -> dict[str, Any]:
    """Each evaluated set's verdict (``set_verdict``: its name keys its resamples, the study's fixed comparator),
    by name, in the order the sets were first evaluated."""
    from study.records.comparing import read_comparator

    comparator = read_comparator(paths)
    verdicts = {}
    for name in evaluated_sets(paths):
        per_image, runs, _ = load_evaluation(paths, name)
        verdicts[name] = set_verdict(per_image, runs, spec=spec, level=level, comparator=comparator,
                                     set_name=name)
    return verdicts


def report_blocks(paths: StudyPaths, spec: "StudySpec", test_per_image: pd.DataFrame, out_dir: Path, *,
                  level: float, roles: dict[str, str], colors: dict[str, str],
                  verdicts: dict[str, Any] | None = None) -> list:
    """The report's sections for the evaluated sets (one per set, with its gallery drawn into ``out_dir``) and the
    pooled verdict; [] when the study was never evaluated. ``verdicts``: the sets' verdicts, if computed already
    (``evaluated_verdicts``)."""
    from analysis import plots
    from analysis.cross_dataset import dataset_blocks, pooled_blocks

    names = evaluated_sets(paths)
    if not names:
        return []
    verdicts = verdicts if verdicts is not None else evaluated_verdicts(paths, spec, level=level)
    out_dir.mkdir(parents=True, exist_ok=True)
    blocks: list = []
    for name in names:
        manifest = read_manifest(paths, name)
        _, runs, gallery = load_evaluation(paths, name)
        picture = plots.plot_gallery(gallery, out_dir / f"gallery-{name}.png", colors=colors)
        missing = sorted({p.stem for p in paths.confirm_results()} - set(runs.get("run", [])))
        blocks += dataset_blocks(name, manifest.model_dump(by_alias=True), verdicts[name], runs, picture,
                                 order=list(roles), missing=missing)
    blocks += pooled_blocks(pooled(paths, spec, test_per_image, level=level))
    return blocks
