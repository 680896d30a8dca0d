"""Statistics anyone can recompute: what ``study export`` adds so that every interval and verdict of the report can
be recomputed from the export alone, and ``study verify EXPORT_DIR``, which does it.

An export carries, beside the report's tables (``verdict.csv``, ``evaluation_verdicts.csv``, ``pooled_verdict.csv``):

    per_image.csv.gz              every confirm run's per-image test scores: method, config_rank, seed, image_id, ...
    evaluation_per_image.csv.gz   the same on every evaluated set (``dataset`` first), when the study was evaluated
    verdict_settings.json         the bootstrap's settings (n_boot, seed, level), the margin, the metric, the roles,
                                  the comparator and how it was chosen, and the sets (name -> file): the recipe
    verdicts.csv                  per set and pooled: target - comparator, its interval, the word
    pairwise.csv                  per set: target minus each method, with its interval
    margins.csv                   per set and pooled: the words at margins of 1, 2, 3 points and 4% of the comparator
    ledger.csv                    the test-split ledger's rows for the splits the study scored
    (``study.records.ledger``)

Scores, their differences and the margin are in points (x100), as every table of the platform shows them (the
ledger's rows are the ledger's own, on its 0..1 scale);
``verdict_settings.json`` says so (``"scores": "points"``). ``verify`` reads only these files (no study folder, no
data, no torch), takes the scores back to the 0..1 scale the analysis computes on, recomputes with ``analysis``
and compares every cell in points (an export written before points, without that key, in its own 0..1 scale);
the first cell that differs is named.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.metric_table import POINTS, from_points, in_points
from study.records import SCORES_IN_POINTS, SCORES_KEY, scores_in_points

SETTINGS = "verdict_settings.json"
PER_IMAGE = "per_image.csv.gz"
EVALUATION_PER_IMAGE = "evaluation_per_image.csv.gz"
VERDICTS, PAIRWISE, MARGINS, LEDGER = "verdicts.csv", "pairwise.csv", "margins.csv", "ledger.csv"
FILES = (PER_IMAGE, EVALUATION_PER_IMAGE, SETTINGS, VERDICTS, PAIRWISE, MARGINS, LEDGER)
POOLED = "pooled"  # the pooled verdict's row in verdicts.csv and margins.csv
_GZIP = {"method": "gzip", "mtime": 0}  # no time stamp in the file: the same scores give the same bytes


class VerifyError(ValueError):
    """The folder cannot be verified (not an export, or one from before per-image scores were exported)."""


def verdict_rows(name: str, verdict) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """One set's verdict as ``verdicts.csv``, ``pairwise.csv`` and ``margins.csv`` hold it."""
    row = {"set": name, "target": verdict.target, "comparator": verdict.best_other or "", "diff": verdict.diff,
           "lo": verdict.ci[0], "hi": verdict.ci[1], "level": verdict.level, "verdict": verdict.verdict}
    pairwise = verdict.pairwise.rename_axis("method").reset_index().assign(set=name)
    return row, pairwise[["set", "method", "diff", "lo", "hi"]], verdict.margins.assign(set=name)


def statistics_frames(verdicts: dict[str, Any], pooled) -> dict[str, pd.DataFrame]:
    """``verdicts.csv``, ``pairwise.csv`` and ``margins.csv`` of the sets' verdicts (``{name: Verdict}``) and the
    pooled verdict (None when the study was never evaluated)."""
    rows, pairwise, margins = [], [], []
    for name, verdict in verdicts.items():
        row, pair, margin = verdict_rows(name, verdict)
        rows.append(row), pairwise.append(pair), margins.append(margin)
    if pooled is not None:
        rows.append({"set": POOLED, "target": pooled.target, "comparator": pooled.other or "", "diff": pooled.diff,
                     "lo": pooled.ci[0], "hi": pooled.ci[1], "level": pooled.level, "verdict": pooled.verdict})
        margins.append(pooled.margins.assign(set=POOLED))
    margins_frame = pd.concat(margins, ignore_index=True)
    return {VERDICTS: pd.DataFrame(rows), PAIRWISE: pd.concat(pairwise, ignore_index=True),
            MARGINS: margins_frame[["set", *[c for c in margins_frame.columns if c != "set"]]]}


def write_per_image(frame: pd.DataFrame, path: Path) -> Path:
    """A per-image frame (0..1) as gzip-compressed CSV in points, the same bytes for the same scores."""
    in_points(frame).to_csv(path, index=False, compression=_GZIP)
    return path


@dataclass
class Verification:
    """What ``verify`` compared: ``checked`` cells, and the ``mismatches`` (file, where, exported, recomputed)."""

    checked: int = 0
    mismatches: list[tuple[str, str, Any, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def compare(self, file: str, where: str, exported: Any, recomputed: Any) -> None:
        self.checked += 1
        if not _same(exported, recomputed):
            self.mismatches.append((file, where, exported, recomputed))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return str(a) == str(b) or (_blank(a) and _blank(b))
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _blank(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def read_settings(export_dir: Path) -> dict[str, Any]:
    export_dir = Path(export_dir)
    if not (export_dir / "spec.yaml").is_file() or not (export_dir / "verdict.csv").is_file():
        raise VerifyError(f"{export_dir} is not a study export: it has no spec.yaml and verdict.csv "
                          "(made by `study export`)")
    if not (export_dir / PER_IMAGE).is_file() or not (export_dir / SETTINGS).is_file():
        raise VerifyError(f"{export_dir} predates per-image scores in exports: it has no {PER_IMAGE} and "
                          f"{SETTINGS}, so its intervals cannot be recomputed from it; `study export` of the study "
                          "with this version writes them")
    return json.loads((export_dir / SETTINGS).read_text())


def set_frames(export_dir: Path, settings: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """Each set's per-image frame, by name, in the settings' order (the study's own test split first)."""
    frames: dict[str, pd.DataFrame] = {}
    cache: dict[str, pd.DataFrame] = {}
    for name, where in settings["sets"].items():
        if where["file"] not in cache:
            cache[where["file"]] = pd.read_csv(Path(export_dir) / where["file"])
        frame = cache[where["file"]]
        frames[name] = frame[frame["dataset"] == where["dataset"]] if where.get("dataset") else frame
    return frames


def verify(export_dir: Path) -> Verification:
    """Recompute every interval and verdict of an export from its per-image scores and settings, and compare each
    cell with the exported tables (see the module docstring). Imports no torch and reads no study folder."""
    from analysis.pooled import pooled_verdict
    from analysis.verdict import compute_verdict

    export_dir = Path(export_dir)
    settings = read_settings(export_dir)
    frames = set_frames(export_dir, settings)
    points = scores_in_points(settings)  # the analysis computes on 0..1; the export's cells are compared as written
    margin = settings["margin"] / POINTS if points else settings["margin"]
    frames = {name: from_points(frame) for name, frame in frames.items()} if points else frames
    shown = in_points if points else (lambda frame: frame)
    common = dict(roles=settings["roles"], margin=margin, metric=settings["metric"],
                  n_boot=settings["n_boot"], seed=settings["seed"], level=settings["level"],
                  comparator=settings["comparator"])
    verdicts = {name: compute_verdict(frame, **common, set_name=name) for name, frame in frames.items()}
    pooled = pooled_verdict(frames, **common) if len(frames) > 1 else None
    result = Verification()
    primary = settings["primary"]
    _compare_table(result, export_dir, "verdict.csv", shown(verdicts[primary].table), None)
    for name in frames:
        if name != primary:
            _compare_table(result, export_dir, "evaluation_verdicts.csv", shown(verdicts[name].table), name)
    recomputed = statistics_frames(verdicts, pooled)
    for file, keys in ((VERDICTS, ["set"]), (PAIRWISE, ["set", "method"]), (MARGINS, ["set", "margin_label"])):
        _compare_frame(result, file, pd.read_csv(export_dir / file, keep_default_na=False, na_values=[""]),
                       shown(recomputed[file]), keys)
    if pooled is not None:
        _compare_frame(result, "pooled_verdict.csv", pd.read_csv(export_dir / "pooled_verdict.csv"),
                       shown(_pooled_table(pooled)), ["set"])
    return result


def _pooled_table(pooled) -> pd.DataFrame:
    """The pooled verdict as ``pooled_verdict.csv`` holds it (``study.records.verdicts.pooled_frame``'s rows)."""
    import numpy as np

    table = pooled.sets.copy()
    table.loc[POOLED] = {"images": int(table["images"].sum()), "seeds": int(table["seeds"].min()), "diff": pooled.diff,
                         "lo": pooled.ci[0], "hi": pooled.ci[1], "se": float(np.nanstd(pooled.boot)), "weight": 1.0,
                         "verdict": pooled.verdict}
    return table.rename_axis("set").reset_index()


def _compare_table(result: Verification, export_dir: Path, file: str, table: pd.DataFrame, dataset: str | None):
    """A verdict table (one row per method): the counts and every metric's mean and interval."""
    exported = pd.read_csv(export_dir / file)
    if dataset is not None:
        exported = exported[exported["dataset"] == dataset]
    recomputed = table.rename_axis("method").reset_index()
    skip = {"method", "role", "level", "dataset", "params", "train_seconds", "epochs"}  # costs are not statistics
    stats = [c for c in exported.columns if c not in skip and c in recomputed.columns]
    _compare_frame(result, file, exported, recomputed, ["method"], columns=stats, label=dataset)


def _compare_frame(result: Verification, file: str, exported: pd.DataFrame, recomputed: pd.DataFrame,
                   keys: list[str], columns: list[str] | None = None, label: str | None = None) -> None:
    """Every cell of ``exported`` in ``columns`` (default: all but the keys) against the recomputed row of the same
    keys; a row on one side only is a mismatch too."""
    result.files.append(file)
    columns = columns or [c for c in exported.columns if c not in keys and c in recomputed.columns]
    mine, theirs = _by_key(recomputed, keys), _by_key(exported, keys)
    prefix = f"{label}: " if label else ""
    for key in [*theirs, *[k for k in mine if k not in theirs]]:
        where = prefix + ", ".join(f"{k} {v}" for k, v in zip(keys, key))
        if key not in mine or key not in theirs:
            result.compare(file, f"row {where}", "present" if key in theirs else "absent",
                           "present" if key in mine else "absent")
            continue
        for column in columns:
            result.compare(file, f"row {where}, column {column}", theirs[key][column], mine[key][column])


def _by_key(frame: pd.DataFrame, keys: list[str]) -> dict[tuple[str, ...], pd.Series]:
    return {tuple(str(v) for v in row[keys]): row for _, row in frame.iterrows()}


def write_statistics(ctx, dest: Path, test_per_image: pd.DataFrame) -> list[Path]:
    """Write the files above (all but ``ledger.csv``: ``write_ledger``) into an export folder; returns them."""
    from study.records.comparing import verdict_settings
    from study.records.decide_log import report_level
    from study.records.verdicts import (
        evaluated_sets,
        evaluated_verdicts,
        evaluation_per_image_frame,
        pooled,
        set_verdict,
        study_test_name,
    )

    spec, paths = ctx.spec, ctx.paths
    level, primary, names = report_level(spec, paths), study_test_name(spec), evaluated_sets(paths)
    settings = verdict_settings(spec, paths, roles=spec.arm_set.roles(), level=level, sets={
        primary: {"file": PER_IMAGE, "dataset": None}, **{n: {"file": EVALUATION_PER_IMAGE, "dataset": n}
                                                           for n in names}})
    verdicts = {primary: set_verdict(test_per_image, None, spec=spec, level=level,
                                     comparator=settings["comparator"], set_name=primary),
                **evaluated_verdicts(paths, spec, level=level)}
    written = [write_per_image(test_per_image, dest / PER_IMAGE)]
    if names:
        written.append(write_per_image(evaluation_per_image_frame(paths), dest / EVALUATION_PER_IMAGE))
    frames = statistics_frames(verdicts, pooled(paths, spec, test_per_image, level=level) if names else None)
    for name, frame in frames.items():
        in_points(frame).to_csv(dest / name, index=False)
        written.append(dest / name)
    settings.update(margin=settings["margin"] * POINTS, **{SCORES_KEY: SCORES_IN_POINTS})
    (dest / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    return [*written, dest / SETTINGS]


def write_ledger(ctx, dest: Path, fingerprints: dict[str, str]) -> list[Path]:
    """``ledger.csv``: the test-split ledger's rows for the splits this study scored ([] when it has none)."""
    from study.records.ledger import COLUMNS, export_rows

    rows = export_rows(ctx.paths.ledger, fingerprints)
    if rows.empty:
        return []
    rows[COLUMNS].to_csv(dest / LEDGER, index=False)  # the ledger's own rows: one format (0..1) wherever it lies
    return [dest / LEDGER]
