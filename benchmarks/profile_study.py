"""Where a study's search time goes: the share of its trial slots spent in each part of the work.

    python benchmarks/profile_study.py STUDY_DIR [--markdown] [--slots N] [--cpus N] [--mlflow-ms MS]

STUDY_DIR is a study folder (``runs/quickstart``, ``~/studies/flickr8k``): ``tune/`` (Tune's experiment: one
folder per trial with its ``result.json`` lines, and ``experiment_state-*.json`` snapshots), the tracking
journal and ``study.json``. Only plain files are read (no Ray), so it runs while the study runs.

The whole is the search's slot time: concurrent trial slots x the search's wall time (from Tune's start to the
last trial's last result, summed over resumes). It splits into

* the epochs' own parts, from each trial's reported metrics (``study.trial.training.run_trial``): training steps
  (``train_seconds - data_seconds``), data loading (``data_seconds``), validation loss, greedy validation
  decoding, metrics. A study whose code predates those fields reports only ``train_seconds`` and
  ``epoch_seconds``: then training (with its data loading) and validation (loss, decoding and metrics
  together) are the split, and the output says so;
* other per-epoch work: Tune's ``time_this_iter_s`` minus ``epoch_seconds`` (checkpoint writes, the report);
  a trial's first iteration also holds its set-up, so only the median of the later iterations' excess counts
  here and the rest as start-up;
* trial start/stop and Ray: the rest of each trial's span (Tune's start time to its last result) outside its
  iterations: building the model, fetching the data, the gaps while the driver handles results;
* MLflow: the driver's tracking calls. Their time is recorded nowhere, so it is estimated as the journal's
  event count x a per-event cost measured here on a fresh sqlite store (or ``--mlflow-ms``); the driver sends
  while trials wait for their next iteration, so it is taken out of the row above (then out of idle);
* unreported epoch time: trials still running (a live study), or the epoch a failed trial lost;
* idle slots: slot time in no trial (actor start-up, scheduling gaps, the tail when fewer trials than slots
  are left).

Slots: ``search.max_concurrent`` of the spec, else the CPUs (``--cpus``, default this machine's) over the spec's
``resources.cpu``; ``--slots`` overrides. If more trials ever ran at once, that count is used.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

FINE = ("data_seconds", "val_loss_seconds", "decode_seconds", "metric_seconds")
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
TRACKED_KINDS = ("trial_start", "trial_result", "trial_end")


@dataclass
class Segment:
    """One uninterrupted run of a trial (a resume or a retry starts a new one)."""

    start: float
    end: float
    iter_seconds: float = 0.0  # Tune's time_this_iter_s summed over the segment's results


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


# ----- reading Tune's files ------------------------------------------------------------------------------
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


def read_spec(study_dir: Path) -> dict[str, Any]:
    """The spec as the study ran it: the text journalled at its (last) start, else the file study.json names."""
    journal = study_dir / "tracking_journal.jsonl"
    text = None
    if journal.is_file():
        for line in journal.read_text().splitlines():
            if '"study_start"' in line:
                try:
                    text = json.loads(line).get("spec") or text
                except json.JSONDecodeError:
                    continue
    if text is None and (study_dir / "study.json").is_file():
        spec_path = Path(json.loads((study_dir / "study.json").read_text()).get("spec", ""))
        text = spec_path.read_text() if spec_path.is_file() else None
    return (yaml.safe_load(text) or {}) if text else {}


def journal_counts(study_dir: Path, trial_ids: set[str]) -> dict[str, int]:
    """Tracking events of the search's trials, by kind (the confirm stage's events are left out)."""
    counts = dict.fromkeys(TRACKED_KINDS, 0)
    journal = study_dir / "tracking_journal.jsonl"
    if not journal.is_file():
        return counts
    for line in journal.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("kind") in counts and event.get("trial") in trial_ids:
            counts[event["kind"]] += 1
    return counts


def measure_mlflow_costs(results: int = 40) -> dict[str, float]:
    """Seconds per tracked event, by kind, on a fresh sqlite store (the store's creation not counted)."""
    import mlflow  # noqa: F401  (it sets its loggers' levels when imported)

    from study.records.paths import sqlite_uri
    from study.tracking import StudyTracker

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its "creating tables" lines
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


def trial_slots(spec: dict[str, Any], cpus: int | None, gpus: int | None) -> int:
    resources = spec.get("resources") or {}
    cpu, gpu = float(resources.get("cpu", 1) or 1), float(resources.get("gpu", 0) or 0)
    slots = int((cpus or os.cpu_count() or 1) // cpu)
    if gpu and gpus is not None:
        slots = min(slots, int(gpus // gpu))
    if (spec.get("search") or {}).get("max_concurrent"):
        slots = min(slots, int(spec["search"]["max_concurrent"]))
    return max(1, slots)


def max_overlap(segments: list[Segment]) -> int:
    events = sorted([(s.start, 1) for s in segments] + [(s.end, -1) for s in segments], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


# ----- the profile ---------------------------------------------------------------------------------------
def profile_study(study_dir: Path, *, slots: int | None = None, cpus: int | None = None, gpus: int | None = None,
                  mlflow_costs: dict[str, float] | None = None) -> Profile:
    """Split a study's search slot time into the table's rows (seconds). ``mlflow_costs``: seconds per event
    by kind (``{"*": s}`` for one cost); measured on a fresh sqlite store when not given."""
    study_dir = Path(study_dir).expanduser()
    tune_dir = study_dir / "tune"
    if not tune_dir.is_dir():
        raise SystemExit(f"{study_dir} has no tune/ folder: not a study folder, or its search has not started")
    session_times, states = read_states(tune_dir)
    spec = read_spec(study_dir)
    notes: list[str] = []

    # A live study: trials still running are counted up to the newest sign of life in the folder.
    files = [p for p in [*tune_dir.glob("*"), *tune_dir.glob("*/result.json"), study_dir / "search_time.json"]
             if p.is_file()]
    observed_until = max((p.stat().st_mtime for p in files), default=0.0)

    trials: dict[str, list[dict[str, Any]]] = {}
    error_times: dict[str, float] = {}
    for result_file in sorted(tune_dir.glob("*/result.json")):
        rows = read_results(result_file)
        trial_id = rows[0]["trial_id"] if rows else result_file.parent.name.rsplit("-", 1)[-1]
        trials[trial_id] = rows
        errors = [p.stat().st_mtime for p in result_file.parent.glob("error.*")]
        if errors:
            error_times[trial_id] = max(errors)
    for trial_id, info in states.items():  # started, no result folder yet
        trials.setdefault(trial_id, [])

    fine = any(all(k in row for k in FINE) for rows in trials.values() for row in rows)
    # A trial's first iteration after a (re)start also holds its set-up: count as per-epoch work only what the
    # later iterations take beyond their epoch.
    later = [row["time_this_iter_s"] - row.get("epoch_seconds", 0.0) for rows in trials.values() for row in rows
             if row.get("iterations_since_restore", 1) > 1 and "time_this_iter_s" in row]
    typical_excess = max(statistics.median(later), 0.0) if later else 0.0

    sec = {key: 0.0 for key, _ in (ROWS_FINE if fine else ROWS_COARSE) + ROWS_REST}
    segments: list[Segment] = []
    tails: list[tuple[Segment, Any]] = []  # (last segment, until when it trained unreported)
    epochs = 0
    for trial_id, rows in trials.items():
        state = states.get(trial_id, {})
        running = state.get("status") in ("RUNNING", "PENDING") or (not state and bool(rows))
        seen: set[Any] = set()
        trial_segments: list[Segment] = []
        for i, row in enumerate(rows):
            iter_s = float(row.get("time_this_iter_s", 0.0))
            at = float(row.get("timestamp", 0))
            if i == len(rows) - 1 and state.get("last_result_time"):
                at = float(state["last_result_time"])
            if row.get("iterations_since_restore", 1) == 1 or not trial_segments:
                start = at - iter_s + 0.5  # Tune's timestamp is whole seconds: mid-second
                if not trial_segments and state.get("start_time"):
                    start = float(state["start_time"])  # set when the trial's actor is ready, to the ms
                trial_segments.append(Segment(start, at))
                first = True
            else:
                first = False
            seg = trial_segments[-1]
            seg.end, seg.iter_seconds = max(seg.end, at), seg.iter_seconds + iter_s
            epoch = row.get("epoch", row.get("training_iteration"))
            if epoch in seen or "epoch_seconds" not in row:  # a resumed trial reports its restored epoch again
                sec["start_stop"] += iter_s
                continue
            seen.add(epoch)
            epochs += 1
            epoch_s, train_s = float(row["epoch_seconds"]), float(row["train_seconds"])
            if fine:
                parts = {"data": row.get("data_seconds", 0.0), "val_loss": row.get("val_loss_seconds", 0.0),
                         "decode": row.get("decode_seconds", 0.0), "metrics": row.get("metric_seconds", 0.0)}
                sec["train_steps"] += train_s - parts["data"]
                for key, value in parts.items():
                    sec[key] += float(value)
                inside = train_s + parts["val_loss"] + parts["decode"] + parts["metrics"]
                sec["per_epoch_other"] += max(epoch_s - inside, 0.0)  # the epoch's own bookkeeping
            else:
                sec["train"] += train_s
                sec["validation"] += epoch_s - train_s
            excess = iter_s - epoch_s
            per_epoch = min(excess, typical_excess) if first else excess
            sec["per_epoch_other"] += max(per_epoch, 0.0)
            sec["start_stop"] += excess - max(per_epoch, 0.0)
        for seg in trial_segments:  # the span outside the trial's iterations
            sec["start_stop"] += seg.end - seg.start - seg.iter_seconds
        if not rows and state.get("start_time"):  # started, nothing reported yet
            trial_segments.append(Segment(float(state["start_time"]), float(state["start_time"])))
        # Training after the last result that no result reports: a running trial's current epoch, a failed
        # trial's last one, and the epoch a trial was in when the budget (or a kill) ended its driver's session.
        for k, seg in enumerate(trial_segments):
            if k + 1 < len(trial_segments):  # retried after an error, or resumed by a later driver
                tails.append((seg, trial_segments[k + 1]))
            elif running:
                tails.append((seg, "live"))
            elif trial_id in error_times:
                tails.append((seg, error_times[trial_id]))
            elif not (state.get("last_result") or {}).get("done", True):
                tails.append((seg, "session"))
        segments.extend(trial_segments)

    if not segments:
        raise SystemExit(f"{study_dir}: no trial has started yet")

    # Driver sessions: from Tune's start to its last write of the experiment state (the search's end).
    sessions = session_times or [(min(s.start for s in segments), max(s.end for s in segments))]

    def session_of(t: float) -> int:
        return max([k for k, (begin, _) in enumerate(sessions) if begin - 2 <= t] or [0])  # timestamps: whole s

    # A session's last write can be later than its last result by at most the epoch then in flight; much later
    # means the file was touched since (a copied folder): then end the session one longest iteration later.
    longest = max((float(row.get("time_this_iter_s", 0.0)) for rows in trials.values() for row in rows), default=0.0)
    ends = []
    for k, (begin, written) in enumerate(sessions):
        reported = max([s.end for s in segments if session_of(s.start) == k] or [begin])
        cap = min(reported + longest, sessions[k + 1][0] if k + 1 < len(sessions) else float("inf"))
        if written > cap:
            notes.append(f"session {k + 1}: its state file was written {written - reported:.0f} s after its last "
                         f"result (copied?): its end is taken as {cap - reported:.0f} s after that result")
        ends.append(min(written, cap))
    for seg, until in tails:
        if until == "live":
            until = observed_until
        elif isinstance(until, Segment):  # up to the retry; a resumed one only until its driver stopped
            same = session_of(until.start) == session_of(seg.start)
            until = until.start if same else ends[session_of(seg.start)]
        elif until == "session":
            until = ends[session_of(seg.start)]
        if until > seg.end:
            sec["unreported"] += until - seg.end
            seg.end = until
    for seg in segments:  # a session lasts at least until its last trial's end
        k = session_of(seg.start)
        ends[k] = max(ends[k], seg.end)
    wall = sum(end - begin for (begin, _), end in zip(sessions, ends))
    if len(sessions) > 1:
        notes.append(f"{len(sessions)} driver sessions (resumed): wall time summed over them")
    ledger = study_dir / "search_time.json"
    if ledger.is_file():
        used = json.loads(ledger.read_text()).get("used_s")
        notes.append(f"search_time.json: {used} s of search wall time used (the budget's clock)")

    spec_slots = slots or trial_slots(spec, cpus, gpus)
    seen_slots = max_overlap(segments)
    used_slots = max(spec_slots, seen_slots)
    if seen_slots > spec_slots:
        notes.append(f"{seen_slots} trials ran at once, more than the {spec_slots} slots computed: using "
                     f"{seen_slots}")
    elif slots is None:
        resources = spec.get("resources") or {}
        notes.append(f"slots: {spec_slots} ({cpus or os.cpu_count()} CPUs / {resources.get('cpu', 1)} CPU per "
                     f"trial{', search.max_concurrent' if (spec.get('search') or {}).get('max_concurrent') else ''}"
                     f"; at most {seen_slots} trials ran at once)")

    counts = journal_counts(study_dir, set(trials))
    if mlflow_costs is None:
        mlflow_costs = measure_mlflow_costs()
        how = "measured here on a fresh sqlite store"
    else:
        how = "as given"
    per_kind = {kind: mlflow_costs.get(kind, mlflow_costs.get("*", 0.0)) for kind in TRACKED_KINDS}
    mlflow = sum(counts[k] * per_kind[k] for k in TRACKED_KINDS)
    sec["mlflow"] = mlflow
    taken = min(mlflow, max(sec["start_stop"], 0.0))
    sec["start_stop"] -= taken
    notes.append("MLflow is not timed in a study: estimated as "
                 + ", ".join(f"{counts[k]} {k} x {1000 * per_kind[k]:.0f} ms" for k in TRACKED_KINDS)
                 + f" ({how}); taken out of trial start/stop and Ray"
                 + (f", {mlflow - taken:.1f} s of it out of idle" if mlflow > taken else ""))
    sec["idle"] = used_slots * wall - sum(s.end - s.start for s in segments) - (mlflow - taken)
    if not fine:
        notes.append("this study's trials predate the fine timing fields (data_seconds, val_loss_seconds, "
                     "decode_seconds, metric_seconds): coarse split, training = train_seconds (with data "
                     "loading), validation = epoch_seconds - train_seconds (loss, decoding and metrics)")
    if sec.get("unreported", 0.0) > 0:
        live = f" (running trials counted until {datetime.fromtimestamp(observed_until, timezone.utc):%H:%M:%S} " \
               "UTC)" if any(until == "live" for _, until in tails) else ""
        notes.append(f"{sec['unreported']:.0f} s of training that no result reports: epochs a time budget, a killed "
                     f"driver or an error cut short, or still running{live}")
    return Profile(study_dir, sec, wall, used_slots, fine, len(trials), epochs, notes)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="study folder (holds tune/, study.json, the tracking journal)")
    parser.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    parser.add_argument("--slots", type=int, help="concurrent trial slots (default: from the spec and --cpus)")
    parser.add_argument("--cpus", type=int, help="CPUs the study ran on (default: this machine's)")
    parser.add_argument("--gpus", type=int, help="GPUs the study ran on (for a spec with resources.gpu)")
    parser.add_argument("--mlflow-ms", type=float, help="ms per MLflow event (default: measured now)")
    args = parser.parse_args(argv)
    costs = None if args.mlflow_ms is None else {"*": args.mlflow_ms / 1000}
    p = profile_study(args.study, slots=args.slots, cpus=args.cpus, gpus=args.gpus, mlflow_costs=costs)
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(format_text(p))
    if args.markdown:
        print()
        print(format_markdown(p))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # study.tracking for the MLflow measurement
    main()
