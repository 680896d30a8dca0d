"""A search's timeline as its files record it, for ``study profile`` (``study.profiling``): each trial's Tune
results (``tune/<trial>/result.json``), Tune's experiment snapshots (one ``experiment_state-*.json`` per driver
session), when each file was last written, and the tracking journal's events. Plain files only (no Ray, unlike
``study.records.trial_tables``, which reads through Tune's storage filesystem), so a running study can be read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from study.records.paths import StudyPaths
from study.tracking.journal import Journal

# What a trial reports about its epoch's parts since the fine timing fields (study.trial.training.run_trial).
FINE = ("data_seconds", "val_loss_seconds", "decode_seconds", "metric_seconds")
TRACKED_KINDS = ("trial_start", "trial_result", "trial_end")


@dataclass
class Segment:
    """One uninterrupted run of a trial (a resume or a retry starts a new one)."""

    start: float
    end: float
    iter_seconds: float = 0.0  # Tune's time_this_iter_s summed over the segment's results


@dataclass
class Timeline:
    """What the files say: each trial's result rows and newest snapshot, the driver sessions' (start, last write),
    when a trial last wrote an error file, and the newest write in the folder (how far a live study got)."""

    trials: dict[str, list[dict[str, Any]]]
    states: dict[str, dict[str, Any]]
    sessions: list[tuple[float, float]]
    error_times: dict[str, float] = field(default_factory=dict)
    observed_until: float = 0.0

    @property
    def fine(self) -> bool:
        """Whether the trials report the fine timing fields (else: training and validation only)."""
        return any(all(k in row for k in FINE) for rows in self.trials.values() for row in rows)


def read_results(path: Path) -> list[dict[str, Any]]:
    """A trial's result.json lines; a line cut short by a live writer is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_states(tune_dir: Path) -> tuple[list[tuple[float, float]], dict[str, dict[str, Any]]]:
    """Tune's experiment_state files (one per driver session): the sessions' (start, last write) times, and the
    newest snapshot of each trial."""
    sessions, trials = [], {}
    for path in sorted(tune_dir.glob("experiment_state-*.json")):  # named by session start: oldest first
        try:
            state = json.loads(path.read_text())
            written = path.stat().st_mtime
        except (OSError, json.JSONDecodeError):
            continue  # being rewritten right now
        if (start := state.get("stats", {}).get("start_time")) is not None:
            sessions.append((float(start), written))
        for parts in state.get("trial_data", []):
            info: dict[str, Any] = {}
            for part in parts:  # the trial's JSON and its run metadata JSON
                try:
                    info.update(json.loads(part))
                except (TypeError, json.JSONDecodeError):
                    continue
            if "trial_id" in info:
                trials[info["trial_id"]] = info
    return sorted(sessions), trials


def read_timeline(study_dir: Path) -> Timeline:
    """The search's timeline from ``<study>/tune/`` (a ValueError when there is none: not a study folder, or a
    search that never started)."""
    tune_dir = Path(study_dir) / "tune"
    if not tune_dir.is_dir():
        raise ValueError(f"{study_dir} has no tune/ folder: not a study folder, or its search has not started")
    sessions, states = read_states(tune_dir)
    # A live study: trials still running are counted up to the newest sign of life in the folder.
    files = [p for p in [*tune_dir.glob("*"), *tune_dir.glob("*/result.json"), Path(study_dir) / "search_time.json"]
             if p.is_file()]
    timeline = Timeline({}, states, sessions, observed_until=max((p.stat().st_mtime for p in files), default=0.0))
    for result_file in sorted(tune_dir.glob("*/result.json")):
        rows = read_results(result_file)
        trial_id = rows[0]["trial_id"] if rows else result_file.parent.name.rsplit("-", 1)[-1]
        timeline.trials[trial_id] = rows
        errors = [p.stat().st_mtime for p in result_file.parent.glob("error.*")]
        if errors:
            timeline.error_times[trial_id] = max(errors)
    for trial_id in states:  # started, no result folder yet
        timeline.trials.setdefault(trial_id, [])
    return timeline


def _journal(study_dir: Path) -> Journal:
    paths = StudyPaths(Path(study_dir), str(Path(study_dir) / "tune"))
    return Journal(paths.journal, paths.journal_sent)


def read_spec(study_dir: Path) -> dict[str, Any]:
    """The spec as the study ran it: the text journalled at its (last) start, else the file study.json names."""
    text = None
    for event in _journal(study_dir).events("study_start"):
        text = event.get("spec") or text
    if text is None and (Path(study_dir) / "study.json").is_file():
        spec_path = Path(json.loads((Path(study_dir) / "study.json").read_text()).get("spec", ""))
        text = spec_path.read_text() if spec_path.is_file() else None
    return (yaml.safe_load(text) or {}) if text else {}


def journal_counts(study_dir: Path, trial_ids: set[str]) -> dict[str, int]:
    """Tracking events of the search's trials, by kind (the confirm stage's events are left out)."""
    journal = _journal(study_dir)
    return {kind: sum(1 for event in journal.events(kind) if event.get("trial") in trial_ids) for kind in TRACKED_KINDS}


def trial_slots(spec: dict[str, Any], cpus: int | None, gpus: int | None) -> int:
    """Concurrent trial slots: the CPUs (and GPUs) over what a trial asks for, at most ``search.max_concurrent``."""
    resources = spec.get("resources") or {}
    cpu, gpu = float(resources.get("cpu", 1) or 1), float(resources.get("gpu", 0) or 0)
    slots = int((cpus or os.cpu_count() or 1) // cpu)
    if gpu and gpus is not None:
        slots = min(slots, int(gpus // gpu))
    if (spec.get("search") or {}).get("max_concurrent"):
        slots = min(slots, int(spec["search"]["max_concurrent"]))
    return max(1, slots)


def max_overlap(segments: list[Segment]) -> int:
    """The most segments that ever ran at once."""
    events = sorted([(s.start, 1) for s in segments] + [(s.end, -1) for s in segments], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak
