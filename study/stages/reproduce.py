"""``study reproduce EXPORT_DIR RUN``: retrain one confirm run of an exported study and set its scores beside the
committed ones.

An export (``study export``) holds what a reviewer needs: the spec the study ran (``spec.yaml``), every confirm run's
configuration and test scores (``confirm_runs.csv``: one row per run, every trial config field as a column;
``seed`` is the run's seed index k, the ``-s<k>`` of its name, and ``torch_seed`` what torch was seeded with,
1000 + k, as the confirm stage sets it; exports from before ``torch_seed`` have the index alone) and the dataset's
fingerprint (``provenance.json``).
The run is retrained with ``run_trial`` on the same data (refused, naming both fingerprints, when the data differs),
the test split decoded with the run's beam and scored with the full coco-caption suite, and each metric printed
beside the committed one with the difference. A run of a study from before the precision setting trained in fp32.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.metric_table import CORPUS_METRICS, POINTS
from study.config import ConfigError, TrialConfig, validate_model
from study.records import read_export_manifest
from study.records.files import repository_root
from study.spec import load_spec


@dataclass
class Reproduction:
    run: str
    config: TrialConfig
    committed: dict[str, float]  # metric -> score in points, as the export holds it (an older export's 0..1 x100)
    reproduced: dict[str, float]  # the same metrics of the retrained run, in points
    checkpoint: Path | None = None  # the retrained model kept (``keep``), for `study caption` or `study evaluate`

    def rows(self) -> list[tuple[str, float, float, float]]:
        """(metric, committed, reproduced, reproduced - committed) of every metric both have."""
        return [(m, self.committed[m], self.reproduced[m], self.reproduced[m] - self.committed[m])
                for m in CORPUS_METRICS if m in self.committed and m in self.reproduced
                and not math.isnan(self.committed[m])]

    @property
    def exact(self) -> bool:
        return all(diff == 0 for *_, diff in self.rows())


def run_config(export_dir: Path, run: str, dataset_root: Path | None = None) -> tuple[TrialConfig, dict, str, int]:
    """(the run's trial config, its committed scores, the export's dataset fingerprint, the CPU threads it trained
    with). ``dataset_root``: the folder the spec's relative dataset paths are taken from (default:
    :func:`spec_folder`)."""
    export_dir = Path(export_dir)
    for name in ("spec.yaml", "confirm_runs.csv", "provenance.json"):
        if not (export_dir / name).is_file():
            raise ConfigError(f"{export_dir} is not a study export: it has no {name} (made by `study export`)")
    runs = pd.read_csv(export_dir / "confirm_runs.csv")
    row = runs[runs["run"] == run]
    if row.empty:
        raise ConfigError(f"{export_dir / 'confirm_runs.csv'} has no run {run!r}; its runs: "
                          f"{', '.join(runs['run'])}")
    row = row.iloc[0]
    dataset_root = dataset_root or spec_folder(export_dir)
    try:
        spec = load_spec(export_dir / "spec.yaml", base=dataset_root, storage=str(export_dir))
    except ConfigError as exc:
        raise ConfigError(f"{exc}\n(the spec's relative dataset paths are taken from {dataset_root}: "
                          "pass --dataset-root with the folder they start from, e.g. the search_spaces/ folder "
                          "the study was run from)") from None
    fields = set(TrialConfig.model_fields) - {"dataset", "seed"}
    values = {k: _plain(row[k]) for k in fields if k in row and not pd.isna(row[k])}
    values.setdefault("precision", "fp32")  # studies from before the precision setting trained in fp32
    # An edited row (hidden=abc, inject=bogus) is one sentence naming the file and run, not pydantic's traceback.
    recorded = row.get("torch_seed")  # exports from before torch_seed hold the index alone: 1000 + it
    torch_seed = 1000 + int(row["seed"]) if recorded is None or pd.isna(recorded) else recorded
    cfg = validate_model(TrialConfig, {**values, "dataset": spec.dataset, "seed": int(torch_seed)},
                         f"{export_dir / 'confirm_runs.csv'} (run {run})", check_paths=False)
    try:
        provenance = json.loads((export_dir / "provenance.json").read_text())
    except ValueError as exc:  # truncated or edited: JSONDecodeError (issue 33, item 13)
        raise ConfigError(f"{export_dir / 'provenance.json'} is not valid JSON ({exc}): re-export the study "
                          "(`study export`) or restore the file") from None
    if not isinstance(provenance, dict):
        raise ConfigError(f"{export_dir / 'provenance.json'} is not the export's provenance (a JSON object)")
    threads = max(1, int(spec.resources.cpu))  # a confirm run's Ray task has as many (float sums depend on it)
    scale = 1 if read_export_manifest(export_dir).in_points else POINTS  # an export from before points holds 0..1
    committed = {m: float(row[m]) * scale for m in CORPUS_METRICS if m in row}
    return cfg, committed, str(provenance.get("dataset fingerprint")), threads


def spec_folder(export_dir: Path) -> Path:
    """Where the exported spec's relative dataset paths start: the folder ``study export`` recorded
    (``spec_folder`` in export.json, inside the repository that holds the export, e.g. ``search_spaces``), else the
    export folder itself (exports from before it was recorded)."""
    recorded = read_export_manifest(export_dir).spec_folder
    if recorded:
        root = repository_root(export_dir)
        folder = Path(recorded) if Path(recorded).is_absolute() or root is None else root / recorded
        if folder.is_dir():
            return folder
    return export_dir


def reproduce(export_dir: Path, run: str, *, dataset_root: Path | None = None, progress: bool = True,
              keep: Path | None = None) -> Reproduction:
    """Retrain ``run`` of the export and score it as the confirm stage does. ``keep``: a folder to keep the
    retrained checkpoint in, as ``<keep>/<run>.pt`` (written whole or not at all), so a reviewer can caption their
    own photos with it (``study caption --checkpoint``)."""
    import torch

    from study.data.prepare import TokenSetting, prepare
    from study.registry import any_needs_grid
    from study.trial.checkpoints import copy_checkpoint
    from study.trial.evaluation import Decoding, score_split
    from study.trial.selection import kept_checkpoint_dir
    from study.trial.training import run_trial

    cfg, committed, fingerprint, threads = run_config(export_dir, run, dataset_root)
    torch.set_num_threads(threads)
    data = prepare(cfg.dataset, [TokenSetting.of(cfg)], need_grid=any_needs_grid([cfg.inject]), progress=progress)
    if data.info["dataset_fingerprint"] != fingerprint:
        raise ConfigError(f"the dataset at {data.info.get('dataset_json', data.info['dataset'])} is not the one the "
                          f"study ran on: its fingerprint is {data.info['dataset_fingerprint']}, the export's "
                          f"provenance.json says {fingerprint}")
    _check_recorded_size(export_dir, run, cfg, data)
    kept = None
    with tempfile.TemporaryDirectory(prefix="reproduce-") as tmp:
        result = run_trial(cfg, data, work_dir=Path(tmp), progress=progress)
        if keep is not None:
            Path(keep).mkdir(parents=True, exist_ok=True)
            # The checkpoint the run was scored with: its chosen epoch's under the best-validation rule.
            chosen = kept_checkpoint_dir(Path(tmp), cfg.select_metric)
            kept = copy_checkpoint(chosen.parent, Path(keep), folder=chosen.name).replace(Path(keep) / f"{run}.pt")
    cfg = cfg.model_copy(update={"precision": result.precision})  # auto, as the run resolved it
    test = score_split(result.model, data, "test", vocab=data.tokens_for(cfg).vocab, decoding=Decoding.of(cfg),
                       full=True)
    return Reproduction(run, cfg, committed, {m: v * POINTS for m, v in test.scores.items()}, kept)


def _check_recorded_size(export_dir: Path, run: str, cfg: TrialConfig, data) -> None:
    """Refuse, before training, a configuration that is not the one the run trained: the model it builds must
    have the parameter count the run recorded (``params``). An edited ``hidden`` was retrained and reported as
    "not exact: other hardware, library versions or precision" (issue 33, item 19)."""
    from study.models import build_captioner

    runs = pd.read_csv(export_dir / "confirm_runs.csv")
    row = runs[runs["run"] == run].iloc[0]
    if "params" not in row or pd.isna(row["params"]):
        return
    model = build_captioner(cfg, len(data.tokens_for(cfg).vocab), data.feature_dim)
    built = sum(p.numel() for p in model.parameters())
    if built != int(row["params"]):
        spec_fixed = load_spec(export_dir / "spec.yaml", check_paths=False, storage=str(export_dir)).fixed
        differ = [f"{k}={getattr(cfg, k)!r} (the spec fixes {v!r})" for k, v in spec_fixed.items()
                  if k in TrialConfig.model_fields and k != "dataset" and getattr(cfg, k) != v]
        raise ConfigError(f"{export_dir / 'confirm_runs.csv'}: run {run}'s configuration is not the one it trained: "
                          f"it builds a model of {built} parameters, the run recorded {int(row['params'])}"
                          + (f"; fields that differ: {', '.join(differ)}" if differ else
                             "; a width, depth, vocabulary or injection field was edited"))


def _plain(value):
    """A CSV cell as the config field wants it (numpy scalars to Python; booleans read back as booleans)."""
    if hasattr(value, "item"):
        value = value.item()
    return value
