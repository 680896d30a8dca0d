"""Where a study's numbers come from: code, data, packages, hardware and time, for the report.

The commit that ran the search is the one the study journalled when it started (``tracking_journal.jsonl``);
a report regenerated later by newer code names both.
"""

from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from study.records import SCORES_IN_POINTS, SCORES_KEY, read_search_time
from study.records.files import atomic_write_json
from study.records.paths import StudyPaths
from study.records.run_results import read_confirm_results
from study.tracking.journal import Journal

PACKAGES = ("torch", "ray", "optuna", "mlflow", "pycocoevalcap", "numpy", "pandas", "efficientnet-lite-pytorch")


def provenance(paths: StudyPaths, data_info: dict[str, Any], *, report_commit: str) -> dict[str, str]:
    """Ordered ``{what: value}`` rows for the report's provenance table."""
    started = _study_start(paths)
    tags = started.get("tags", {})
    search_commit = tags.get("mlflow.source.git.commit") or tags.get("git_commit") or "unknown"
    rows = {"search run by commit": search_commit, "report written by commit": report_commit,
            "report written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "dataset": f"{data_info.get('dataset')} ({data_info.get('dataset_json')})",
            "dataset fingerprint": str(data_info.get("dataset_fingerprint")),
            "image encoder": str(data_info.get("encoder")),
            "precision": _precision(paths)}
    if paths.search_time.is_file():
        used = read_search_time(paths.search_time)
        rows["search time budget"] = f"{_hours(used.used_s)} used of {_hours(used.budget_s)}"
    spans = [(r.started_ms / 1000, r.ended_ms / 1000) for r in read_confirm_results(paths).values()
             if r.started_ms and r.ended_ms]  # runs from before spans were recorded have none
    rows.update(wall_time_rows(Journal(paths.journal, paths.journal_sent), spans))
    rows["hardware"] = _hardware()
    rows["python"] = platform.python_version()
    for name in PACKAGES:
        try:
            rows[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            rows[name] = "not installed"
    rows[SCORES_KEY] = SCORES_IN_POINTS  # the scale of the report's tables: an export refuses a report from before it
    return rows


# What an epoch's wall time is made of (training.py's epoch record): training (data included), the val loss, the
# greedy val decode and its metrics.
EPOCH_SECONDS = ("train_seconds", "val_loss_seconds", "decode_seconds", "metric_seconds")


def wall_time_rows(journal: Journal, runs: list[tuple[float, float]]) -> dict[str, str]:
    """``search wall time`` and ``confirm wall time`` rows: how long the machine worked on each stage.

    Each trial-epoch spans the ``EPOCH_SECONDS`` before its journalled time, each confirm run (``runs``, in
    seconds) its recorded start and end (``started_ms``/``ended_ms`` in its result file); a stage's wall time is
    the length of the union of its spans, so trials that ran side by side count once and the hours between an
    interrupted driver and its ``study resume`` not at all."""
    epochs = [(e["time"] / 1000 - sum(e["metrics"].get(k, 0.0) for k in EPOCH_SECONDS), e["time"] / 1000)
              for e in journal.events("trial_result") if e.get("time")]
    rows = {}
    if epochs:
        rows["search wall time"] = (f"{_hours(union_seconds(epochs))} while trials trained "
                                    f"({len(epochs)} trial-epochs, {_hours(sum(b - a for a, b in epochs))} of "
                                    "trial time)")
    if runs:
        rows["confirm wall time"] = (f"{_hours(union_seconds(runs))} ({len(runs)} runs, "
                                     f"{_hours(sum(b - a for a, b in runs))} of run time)")
    return rows


def _hours(seconds: float) -> str:
    """``1.48 h`` from an hour on; below it minutes and seconds (a quickstart's search read "0.01 h")."""
    from study.progress import duration

    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else duration(seconds)


def union_seconds(spans: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: overlapping time counted once, gaps not at all."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def check_dataset_unchanged(paths: StudyPaths, data_info: dict[str, Any]) -> None:
    """Refuse to go on with a study whose dataset changed since its search began (images moved between splits,
    captions replaced): its trials were ranked on other data, and its confirm runs would be scored on another test
    split. The fingerprint the search recorded is in the journal's first ``study_start`` event."""
    from study.config import ConfigError

    recorded = _study_start(paths).get("tags", {}).get("dataset_fingerprint")
    now = str(data_info.get("dataset_fingerprint"))
    if recorded and recorded != now:
        raise ConfigError(
            f"the dataset {data_info.get('dataset_json', data_info.get('dataset'))} changed since study "
            f"{paths.root.name}'s search began: its fingerprint was {recorded}, it is {now} now (images, splits or "
            "captions differ). Restore the data the study ran on, or start a new study on this data "
            "(study run SPEC --new)")


def _precision(paths: StudyPaths) -> str:
    """What every trial and confirm run trained and decoded in (study.json; fp32 for studies begun before it)."""
    try:
        pinned = json.loads(paths.study_file.read_text()).get("precision")
    except (OSError, ValueError, AttributeError):
        return "unknown"
    return f"{pinned} (autocast around the forward pass; weights and loss fp32)" if pinned == "bf16" else \
        (pinned or "fp32")


def _study_start(paths: StudyPaths) -> dict[str, Any]:
    """The study's first ``study_start`` event (the driver that began the search), or {}."""
    return next(Journal(paths.journal, paths.journal_sent).events("study_start"), {})


def _hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    text = f"{os.cpu_count()} CPU cores ({cpu})"
    try:
        import torch

        if torch.cuda.is_available():
            text += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return text


def write_report_provenance(paths: StudyPaths, rows: dict[str, Any]) -> Path:
    """The report's provenance table, beside it as ``report/provenance.json`` (``study export`` copies it)."""
    return atomic_write_json(paths.report_provenance, rows, indent=2)


def read_report_provenance(paths: StudyPaths) -> dict[str, Any]:
    """The provenance the last ``study report`` wrote ({} before the first report)."""
    path = paths.report_provenance
    return json.loads(path.read_text()) if path.is_file() else {}
