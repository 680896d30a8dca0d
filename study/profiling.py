"""``study profile STUDY``: where a study's search time went, as shares of its trial slots' time.

The whole is the search's slot time: concurrent trial slots x the search's wall time (from Tune's start to the last
trial's last result, summed over resumes; read by ``study.records.search_timeline``). It splits into

* the epochs' own parts, from each trial's reported metrics (``study.trial.training.run_trial``): training steps
  (``train_seconds - data_seconds``), data loading, validation loss, greedy validation decoding, metrics. A study
  whose code predates those fields reports only ``train_seconds`` and ``epoch_seconds``: then training (with its
  data loading) and validation are the split, and a note says so;
* other per-epoch work: Tune's ``time_this_iter_s`` minus ``epoch_seconds`` (checkpoint writes, the report); a
  trial's first iteration also holds its set-up, so only the median of the later iterations' excess counts here
  and the rest as start-up;
* trial start/stop and Ray: the rest of each trial's span outside its iterations;
* MLflow: the driver's tracking calls, recorded nowhere, so estimated as the journal's event count x a per-event
  cost measured on a fresh sqlite store (or given); taken out of the row above (then out of idle);
* unreported epoch time: trials still running, or the epoch a failed, stopped or killed trial lost;
* idle slots: slot time in no trial (actor start-up, scheduling gaps, the tail with fewer trials than slots).

Slots: ``search.max_concurrent`` of the spec, else the CPUs over ``resources.cpu``; ``slots`` overrides, and more
trials seen at once than that wins.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from study.records import read_search_time
from study.records.paths import StudyPaths
from study.records.search_timeline import (
    FINE,
    TRACKED_KINDS,
    Segment,
    Timeline,
    journal_counts,
    max_overlap,
    read_spec,
    read_timeline,
    trial_slots,
)

# Rows of the table, in order: (key, label).
ROWS_FINE = [
    ("train_steps", "training steps (forward, backward, optimiser)"),
    ("data", "data loading (batch tokens + features)"),
    ("val_loss", "validation loss (teacher-forced)"),
    ("decode", "validation decoding (greedy)"),
    ("metrics", "metrics (CIDEr-D, BLEU-4 of the decoded captions)"),
]
ROWS_COARSE = [
    ("train", "training (steps and data loading)"),
    ("validation", "validation (loss, decoding and metrics)"),
]
ROWS_REST = [
    ("per_epoch_other", "other per-epoch work (checkpoint, report)"),
    ("start_stop", "trial start/stop and Ray"),
    ("mlflow", "MLflow tracking (estimated)"),
    ("unreported", "epochs cut short or not reported yet (stopped, failed, running)"),
    ("idle", "idle slots"),
]
MODEL_WORK = ("train_steps", "val_loss", "decode", "train", "validation")


@dataclass
class Profile:
    study: Path
    seconds: dict[str, float]  # row key -> slot seconds
    wall: float
    slots: int
    fine: bool
    trials: int
    epochs: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.slots * self.wall

    def rows(self) -> list[tuple[str, float, float]]:
        """(label, seconds, percent of slot time), rows with nothing in them left out."""
        keys = (ROWS_FINE if self.fine else ROWS_COARSE) + ROWS_REST
        return [(label, self.seconds[key], 100 * self.seconds[key] / self.total)
                for key, label in keys if key in self.seconds and (self.seconds[key] > 0 or key != "unreported")]

    @property
    def trial_seconds(self) -> float:
        """Slot time inside trials' reported work: everything but idle, MLflow's driver time and unreported."""
        return sum(v for k, v in self.seconds.items() if k not in ("idle", "unreported", "mlflow"))

    @property
    def model_share(self) -> float:
        """Percent of trial time (reported part) inside model work (steps, val loss, decoding)."""
        model = sum(self.seconds.get(k, 0.0) for k in MODEL_WORK)
        return 100 * model / max(self.trial_seconds + self.seconds.get("mlflow", 0.0), 1e-9)


def measure_mlflow_costs(results: int = 40) -> dict[str, float]:
    """Seconds per tracked event, by kind, on a fresh sqlite store (the store's creation not counted)."""
    from study.records.paths import sqlite_uri
    from study.tracking import StudyTracker
    metrics = {k: 1.0 for k in ("train_loss", "val_loss", "val_bpc", "val_CIDEr-D", "val_BLEU-4", "current_lr",
                                "train_seconds", "epoch_seconds", "tokens_per_second", "params", *FINE)}
    costs: dict[str, list[float]] = {kind: [] for kind in TRACKED_KINDS}
    with tempfile.TemporaryDirectory(prefix="profile-mlflow-") as tmp:
        tracker = StudyTracker(sqlite_uri(Path(tmp) / "mlflow.db"), "profile", "profile", Path(tmp))
        tracker.start_study({"trials": 4}, {"git_commit": "x"})  # imports MLflow, creates the tables

        def timed(kind: str, call, *args, **kwargs) -> None:
            t0 = tracker.seconds_in_mlflow
            call(*args, **kwargs)
            costs[kind].append(tracker.seconds_in_mlflow - t0)

        for t in range(4):
            timed("trial_start", tracker.trial_started, f"t{t}", f"trial-{t}", {"lr": 0.001, "hidden": 64})
        for i in range(results):
            timed("trial_result", tracker.trial_result, f"t{i % 4}", metrics, step=i // 4 + 1)
        for t in range(4):
            timed("trial_end", tracker.trial_finished, f"t{t}", "completed")
    return {kind: statistics.median(values) for kind, values in costs.items()}


# ----- the profile ---------------------------------------------------------------------------------------
@dataclass
class _Count:
    """The profile being summed: slot seconds by row, the trials' segments, and the tails of training after a
    segment's last result that no result reports ((segment, until when): a time, a later segment, "live" or
    "session")."""

    sec: dict[str, float]
    segments: list[Segment] = field(default_factory=list)
    tails: list[tuple[Segment, Any]] = field(default_factory=list)
    epochs: int = 0


def profile_study(study_dir: Path, *, slots: int | None = None, cpus: int | None = None, gpus: int | None = None,
                  mlflow_costs: dict[str, float] | None = None) -> Profile:
    """Split a study's search slot time into the table's rows (seconds). ``mlflow_costs``: seconds per event
    by kind (``{"*": s}`` for one cost); measured on a fresh sqlite store when not given. A ValueError names a
    folder that is not a started study."""
    study_dir = Path(study_dir).expanduser()
    timeline = read_timeline(study_dir)
    notes: list[str] = []
    count = _Count({key: 0.0 for key, _ in (ROWS_FINE if timeline.fine else ROWS_COARSE) + ROWS_REST})
    typical_excess = _typical_excess(timeline)
    for trial_id, rows in timeline.trials.items():
        _count_trial(count, timeline, trial_id, rows, typical_excess)
    if not count.segments:
        raise ValueError(f"{study_dir}: no trial has started yet")
    wall = _wall_time(count, timeline, notes)
    if StudyPaths.at(study_dir).search_time.is_file():
        used = read_search_time(StudyPaths.at(study_dir).search_time).used_s
        notes.append(f"search_time.json: {used} s of search wall time used (the budget's clock)")
    spec = read_spec(study_dir)
    used_slots = _slots(spec, count.segments, slots, cpus, gpus, notes)
    mlflow_left = _mlflow(count, journal_counts(study_dir, set(timeline.trials)), mlflow_costs, notes)
    count.sec["idle"] = used_slots * wall - sum(s.end - s.start for s in count.segments) - mlflow_left
    if not timeline.fine:
        notes.append("this study's trials predate the fine timing fields (data_seconds, val_loss_seconds, "
                     "decode_seconds, metric_seconds): coarse split, training = train_seconds (with data "
                     "loading), validation = epoch_seconds - train_seconds (loss, decoding and metrics)")
    if count.sec.get("unreported", 0.0) > 0:
        observed = datetime.fromtimestamp(timeline.observed_until, timezone.utc)
        live = f" (running trials counted until {observed:%H:%M:%S} UTC)" if any(
            until == "live" for _, until in count.tails) else ""
        notes.append(f"{count.sec['unreported']:.0f} s of training that no result reports: epochs a time budget, a "
                     f"killed driver or an error cut short, or still running{live}")
    return Profile(study_dir, count.sec, wall, used_slots, timeline.fine, len(timeline.trials), count.epochs, notes)


def _typical_excess(timeline: Timeline) -> float:
    """A trial's first iteration after a (re)start also holds its set-up: what the later iterations take beyond
    their epoch (the median) is the per-epoch work; the first one's rest is start-up."""
    later = [row["time_this_iter_s"] - row.get("epoch_seconds", 0.0) for rows in timeline.trials.values()
             for row in rows if row.get("iterations_since_restore", 1) > 1 and "time_this_iter_s" in row]
    return max(statistics.median(later), 0.0) if later else 0.0


def _count_trial(count: _Count, timeline: Timeline, trial_id: str, rows: list[dict[str, Any]],
                 typical_excess: float) -> None:
    """One trial's results into the rows; its segments (a resume or a retry starts one) and their tails."""
    state = timeline.states.get(trial_id, {})
    seen: set[Any] = set()
    trial_segments: list[Segment] = []
    for i, row in enumerate(rows):
        iter_s = float(row.get("time_this_iter_s", 0.0))
        at = float(row.get("timestamp", 0))
        if i == len(rows) - 1 and state.get("last_result_time"):
            at = float(state["last_result_time"])
        first = row.get("iterations_since_restore", 1) == 1 or not trial_segments
        if first:
            start = at - iter_s + 0.5  # Tune's timestamp is whole seconds: mid-second
            if not trial_segments and state.get("start_time"):
                start = float(state["start_time"])  # set when the trial's actor is ready, to the ms
            trial_segments.append(Segment(start, at))
        seg = trial_segments[-1]
        seg.end, seg.iter_seconds = max(seg.end, at), seg.iter_seconds + iter_s
        epoch = row.get("epoch", row.get("training_iteration"))
        if epoch in seen or "epoch_seconds" not in row:  # a resumed trial reports its restored epoch again
            count.sec["start_stop"] += iter_s
            continue
        seen.add(epoch)
        count.epochs += 1
        _count_epoch(count.sec, row, timeline.fine)
        excess = iter_s - float(row["epoch_seconds"])
        per_epoch = min(excess, typical_excess) if first else excess
        count.sec["per_epoch_other"] += max(per_epoch, 0.0)
        count.sec["start_stop"] += excess - max(per_epoch, 0.0)
    for seg in trial_segments:  # the span outside the trial's iterations
        count.sec["start_stop"] += seg.end - seg.start - seg.iter_seconds
    if not rows and state.get("start_time"):  # started, nothing reported yet
        trial_segments.append(Segment(float(state["start_time"]), float(state["start_time"])))
    _tails(count, timeline, trial_id, trial_segments, rows)
    count.segments.extend(trial_segments)


def _count_epoch(sec: dict[str, float], row: dict[str, Any], fine: bool) -> None:
    """One reported epoch's own parts."""
    epoch_s, train_s = float(row["epoch_seconds"]), float(row["train_seconds"])
    if not fine:
        sec["train"] += train_s
        sec["validation"] += epoch_s - train_s
        return
    parts = {"data": row.get("data_seconds", 0.0), "val_loss": row.get("val_loss_seconds", 0.0),
             "decode": row.get("decode_seconds", 0.0), "metrics": row.get("metric_seconds", 0.0)}
    sec["train_steps"] += train_s - parts["data"]
    for key, value in parts.items():
        sec[key] += float(value)
    inside = train_s + parts["val_loss"] + parts["decode"] + parts["metrics"]
    sec["per_epoch_other"] += max(epoch_s - inside, 0.0)  # the epoch's own bookkeeping


def _tails(count: _Count, timeline: Timeline, trial_id: str, trial_segments: list[Segment],
           rows: list[dict[str, Any]]) -> None:
    """Training after a segment's last result that no result reports: a running trial's current epoch, a failed
    trial's last one, and the epoch a trial was in when the budget (or a kill) ended its driver's session."""
    state = timeline.states.get(trial_id, {})
    running = state.get("status") in ("RUNNING", "PENDING") or (not state and bool(rows))
    for k, seg in enumerate(trial_segments):
        if k + 1 < len(trial_segments):  # retried after an error, or resumed by a later driver
            count.tails.append((seg, trial_segments[k + 1]))
        elif running:
            count.tails.append((seg, "live"))
        elif trial_id in timeline.error_times:
            count.tails.append((seg, timeline.error_times[trial_id]))
        elif not (state.get("last_result") or {}).get("done", True):
            count.tails.append((seg, "session"))


def _wall_time(count: _Count, timeline: Timeline, notes: list[str]) -> float:
    """The search's wall time, summed over its driver sessions (Tune's start to its last write of the experiment
    state); the tails closed at their end, and a session's end no earlier than its last trial's."""
    segments = count.segments
    sessions = timeline.sessions or [(min(s.start for s in segments), max(s.end for s in segments))]

    def session_of(t: float) -> int:
        return max([k for k, (begin, _) in enumerate(sessions) if begin - 2 <= t] or [0])  # timestamps: whole s

    # A session's last write can be later than its last result by at most the epoch then in flight; much later
    # means the file was touched since (a copied folder): then end the session one longest iteration later.
    longest = max((float(row.get("time_this_iter_s", 0.0)) for rows in timeline.trials.values() for row in rows),
                  default=0.0)
    ends = []
    for k, (begin, written) in enumerate(sessions):
        reported = max([s.end for s in segments if session_of(s.start) == k] or [begin])
        cap = min(reported + longest, sessions[k + 1][0] if k + 1 < len(sessions) else float("inf"))
        if written > cap:
            notes.append(f"session {k + 1}: its state file was written {written - reported:.0f} s after its last "
                         f"result (copied?): its end is taken as {cap - reported:.0f} s after that result")
        ends.append(min(written, cap))
    for seg, until in count.tails:
        if until == "live":
            until = timeline.observed_until
        elif isinstance(until, Segment):  # up to the retry; a resumed one only until its driver stopped
            until = until.start if session_of(until.start) == session_of(seg.start) else ends[session_of(seg.start)]
        elif until == "session":
            until = ends[session_of(seg.start)]
        if until > seg.end:
            count.sec["unreported"] += until - seg.end
            seg.end = until
    for seg in segments:  # a session lasts at least until its last trial's end
        ends[session_of(seg.start)] = max(ends[session_of(seg.start)], seg.end)
    if len(sessions) > 1:
        notes.append(f"{len(sessions)} driver sessions (resumed): wall time summed over them")
    return sum(end - begin for (begin, _), end in zip(sessions, ends))


def _slots(spec: dict[str, Any], segments: list[Segment], slots: int | None, cpus: int | None, gpus: int | None,
           notes: list[str]) -> int:
    """The slots the search had: as given, else from the spec and the CPUs; more trials seen at once wins."""
    spec_slots = slots or trial_slots(spec, cpus, gpus)
    seen_slots = max_overlap(segments)
    if seen_slots > spec_slots:
        notes.append(f"{seen_slots} trials ran at once, more than the {spec_slots} slots computed: using "
                     f"{seen_slots}")
    elif slots is None:
        resources = spec.get("resources") or {}
        notes.append(f"slots: {spec_slots} ({cpus or os.cpu_count()} CPUs / {resources.get('cpu', 1)} CPU per "
                     f"trial{', search.max_concurrent' if (spec.get('search') or {}).get('max_concurrent') else ''}"
                     f"; at most {seen_slots} trials ran at once)")
    return max(spec_slots, seen_slots)


def _mlflow(count: _Count, counts: dict[str, int], costs: dict[str, float] | None, notes: list[str]) -> float:
    """The driver's MLflow time (events x cost), taken out of trial start/stop and Ray; returns what is left to
    take out of idle."""
    how = "as given" if costs is not None else "measured here on a fresh sqlite store"
    costs = costs if costs is not None else measure_mlflow_costs()
    per_kind = {kind: costs.get(kind, costs.get("*", 0.0)) for kind in TRACKED_KINDS}
    mlflow = sum(counts[k] * per_kind[k] for k in TRACKED_KINDS)
    count.sec["mlflow"] = mlflow
    taken = min(mlflow, max(count.sec["start_stop"], 0.0))
    count.sec["start_stop"] -= taken
    notes.append("MLflow is not timed in a study: estimated as "
                 + ", ".join(f"{counts[k]} {k} x {1000 * per_kind[k]:.0f} ms" for k in TRACKED_KINDS)
                 + f" ({how}); taken out of trial start/stop and Ray"
                 + (f", {mlflow - taken:.1f} s of it out of idle" if mlflow > taken else ""))
    return mlflow - taken


# ----- output -------------------------------------------------------------------------------------------
def format_text(p: Profile) -> str:
    lines = [f"study {p.study}: {p.trials} trials, {p.epochs} epochs, wall {p.wall:.0f} s x {p.slots} slots "
             f"= {p.total:.0f} slot-seconds",
             f"{'part':<64} {'seconds':>9} {'share':>7}"]
    lines += [f"{label:<64} {seconds:>9.1f} {share:>6.1f}%" for label, seconds, share in p.rows()]
    lines.append(f"{'total':<64} {sum(r[1] for r in p.rows()):>9.1f} {sum(r[2] for r in p.rows()):>6.1f}%")
    lines.append(f"model work (training steps{', val loss, decoding' if p.fine else ' + data, validation'}) "
                 f"= {p.model_share:.1f}% of trial time (slot time less idle and unreported)")
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def format_markdown(p: Profile) -> str:
    lines = ["| part | seconds | share of slot time |", "|---|---:|---:|"]
    lines += [f"| {label} | {seconds:.0f} | {share:.1f}% |" for label, seconds, share in p.rows()]
    lines.append(f"| **total** ({p.slots} slots x {p.wall:.0f} s wall) | {p.total:.0f} | 100% |")
    return "\n".join(lines)
