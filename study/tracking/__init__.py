"""A study's tracking events: recorded in its journal first, then sent to MLflow (``study.tracking.mlflow_store``).

One parent run per study, one nested child run per trial. Two known pains of Ray's own MLflow callback are
designed out:

* **Duplicates / orphan RUNNING runs after a resume.** Each trial's run id is remembered in the study
  folder (``mlflow_runs.json``), keyed by Tune's trial id, so a resumed trial logs into its own run again,
  and every run is closed with a final status when the study ends.
* **A dead tracking server kills the study.** Every event is first appended to a local journal
  (``tracking_journal.jsonl``) and only then sent. When the server does not answer, the tracker warns
  once, keeps journalling and retries later; ``study sync`` (or the next study event once the server is
  back) replays what was not sent. Nothing computed is lost.

The confirm stage's runs are child runs too (tag ``kind=confirm``, key ``confirm/<name>`` in ``mlflow_runs.json``,
so a later ``study report`` or ``study decide`` adds only the new ones), and the verdict is a table artifact
plus a few headline metrics on the parent. Runs carry MLflow's standard tags (``mlflow.source.git.commit``,
``mlflow.source.name``, ``mlflow.user``, ``mlflow.note.content``) and the parent the dataset as an input.
"""

from __future__ import annotations

import getpass
import logging
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from study.records.paths import StudyPaths
from study.tracking.journal import Journal
from study.tracking.mlflow_store import STUDY_KEY, MlflowStore

if TYPE_CHECKING:
    from study.spec import StudySpec

log = logging.getLogger(__name__)

RETRY_SECONDS = 30.0  # how long an unreachable server is left alone before the next try


def git_commit() -> str:
    """The project's git commit, or 'unknown' outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def source_tags(source: str, description: str = "") -> dict[str, str]:
    """MLflow's standard run tags: commit, entry point, user and (the spec's description) the run's note."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (e.g. some containers)
        user = "unknown"
    tags = {"mlflow.source.git.commit": git_commit(), "mlflow.source.name": source, "mlflow.source.type": "LOCAL",
            "mlflow.user": user}
    if description.strip():
        tags["mlflow.note.content"] = description.strip()
    return tags


CONFIRM_PREFIX = "confirm/"  # mlflow_runs.json keys of confirm runs (the rest are Tune trial ids)


def _params(values: dict[str, Any]) -> dict[str, str]:
    # MLflow params are strings of at most 6000 characters.
    return {k: str(v)[:6000] for k, v in values.items()}


@dataclass
class StudyTracker:
    """Journals study and trial events in ``study_dir`` and mirrors them into MLflow."""

    uri: str
    experiment: str
    study_name: str
    study_dir: Path

    def __post_init__(self) -> None:
        self.study_dir = Path(self.study_dir)
        self.study_dir.mkdir(parents=True, exist_ok=True)
        paths = StudyPaths.at(self.study_dir)
        self.journal = Journal(paths.journal, paths.journal_sent)
        self.store = MlflowStore(self.uri, self.experiment, self.study_name, self.study_dir)
        # Confirm runs journalled already (a re-run adds only new ones).
        self.confirm_logged: set[str] = {event["key"] for event in self.journal.events("confirm_run")}
        # study evaluate's additions to confirm runs journalled already, by tag (each is sent once).
        self.confirm_metrics_logged: set[str] = {event["tag"] for event in self.journal.events("confirm_metrics")}
        # The newest epoch journalled for each trial, across drivers: a resumed trial tells Tune its restored
        # epoch again (its result may not have reached the killed driver), and it must not be logged twice.
        self.last_step: dict[str, int] = {}
        for event in self.journal.events("trial_result"):
            self.last_step[event["trial"]] = max(self.last_step.get(event["trial"], 0), event["step"])
        # Standard tags every child run gets (set by start_study: commit, entry point, user).
        self.child_tags: dict[str, str] = {}
        self._offline_since: float | None = None
        self._warned = False
        self.seconds_in_mlflow = 0.0
        self.events_sent = 0

    # ----- events (journal first, then send) -----------------------------------------------------------
    def start_study(self, params: dict[str, Any], tags: dict[str, str], spec_text: str | None = None,
                    dataset: dict[str, str] | None = None) -> None:
        """``tags`` may hold MLflow's standard ones (:func:`source_tags`): child runs get the ``mlflow.source.*``
        and ``mlflow.user`` ones too. ``dataset``: ``{name, digest, source}``, logged as the parent's input."""
        self.child_tags = {k: v for k, v in tags.items() if k.startswith(("mlflow.source.", "mlflow.user"))}
        self._event({"kind": "study_start", "params": _params(params), "tags": tags, "spec": spec_text,
                     "dataset": dataset})

    def trial_started(self, trial_id: str, run_name: str, params: dict[str, Any], arm: str | None = None) -> None:
        """A search trial's run (tags ``kind=trial`` and its ``arm``). Its ``seed`` (what torch is seeded with) is
        logged as ``torch_seed``: in MLflow ``seed`` is a confirm run's seed index alone (docs/mlflow.md)."""
        params = {("torch_seed" if k == "seed" else k): v for k, v in params.items()}
        self._event({"kind": "trial_start", "trial": trial_id, "name": run_name, "params": _params(params),
                     "tags": {**self.child_tags, **({"arm": arm} if arm else {})}, "time": int(time.time() * 1000)})

    def trial_result(self, trial_id: str, metrics: dict[str, float], step: int) -> bool:
        """Journal (and send) one epoch's metrics. Returns False, logging nothing, for an epoch already logged.
        The parameter count (``params``) is logged once, as a run parameter, with the trial's first epoch."""
        if int(step) <= self.last_step.get(trial_id, 0):
            return False
        first = trial_id not in self.last_step
        self.last_step[trial_id] = int(step)
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        count = clean.pop("params", None)
        event = {"kind": "trial_result", "trial": trial_id, "metrics": clean, "step": int(step),
                 "time": int(time.time() * 1000)}
        if first and count is not None:
            event["params"] = {"params": str(int(count))}
        self._event(event)
        return True

    def trial_finished(self, trial_id: str, status: str, reason: str | None = None,
                       best: tuple[str, str] | None = None) -> None:
        """``best``: (metric, mode): log the trial's best epoch by that metric as summary metrics
        ``best_<metric>`` and ``best_epoch`` (the score the leaderboard and the confirm stage rank by)."""
        summary = self._best_epoch(trial_id, *best) if best else {}
        self._event({"kind": "trial_end", "trial": trial_id, "status": status, "reason": reason,
                     "summary": summary, "time": int(time.time() * 1000)})

    def _best_epoch(self, trial_id: str, metric: str, mode: str) -> dict[str, float]:
        found: dict[str, Any] | None = None
        for event in self.journal.events("trial_result"):
            value = event["metrics"].get(metric)
            if event["trial"] != trial_id or value is None or value != value:
                continue
            if found is None or (value > found["value"] if mode == "max" else value < found["value"]):
                found = {"value": value, "step": event["step"]}
        return {} if found is None else {f"best_{metric}": found["value"], "best_epoch": float(found["step"])}

    def confirm_run(self, name: str, params: dict[str, Any], metrics: dict[str, float], artifacts: list[Path], *,
                    history: list[dict[str, Any]] | None = None, span: tuple[int | None, int | None] = (None, None),
                    note: str | None = None, arm: str | None = None) -> bool:
        """Journal one confirm run as a child run (``kind=confirm``) with its files as artifacts, its per-epoch
        metrics (``history``, like a search trial's), its real start and end (``span``, epoch milliseconds:
        MLflow's duration), a ``note`` saying what made it and its ``arm`` (a tag, as on the search trials). Returns
        False, logging nothing, for a run journalled before (``study decide`` and a re-run report log only new ones)."""
        key = CONFIRM_PREFIX + name
        if key in self.confirm_logged or key in self.store.runs:
            return False
        self.confirm_logged.add(key)
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        epochs = [{k: float(v) for k, v in epoch.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                  for epoch in history or []]
        tags = {**self.child_tags, **({"mlflow.note.content": note} if note else {}), **({"arm": arm} if arm else {})}
        self._event({"kind": "confirm_run", "key": key, "name": f"confirm-{name}", "params": _params(params),
                     "metrics": clean, "epochs": epochs, "start": span[0], "end": span[1], "tags": tags,
                     "time": int(time.time() * 1000), "artifacts": [str(Path(p).resolve()) for p in artifacts]})
        return True

    # ----- study evaluate (study/stages/evaluate.py): a confirm run's scores on another dataset ----------------
    def confirm_metrics(self, name: str, metrics: dict[str, float], *, tag: str, artifacts: list[Path] = (),
                        artifact_path: str | None = None) -> bool:
        """Journal more metrics (and artifacts) for confirm run ``name``, logged before: its scores on another
        dataset, named ``<dataset>/<metric>``. ``tag`` names this addition (dataset, run, their versions): each is
        journalled once. Returns False, logging nothing, for a tag journalled before."""
        if tag in self.confirm_metrics_logged:
            return False
        self.confirm_metrics_logged.add(tag)
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._event({"kind": "confirm_metrics", "key": CONFIRM_PREFIX + name, "name": f"confirm-{name}", "tag": tag,
                     "metrics": clean, "time": int(time.time() * 1000), "artifact_path": artifact_path,
                     "artifacts": [str(Path(p).resolve()) for p in artifacts]})
        return True

    def study_table(self, data: dict[str, list], artifact_file: str) -> None:
        """A table artifact on the parent (``mlflow.log_table``: the UI's artifact view shows it as a table)."""
        self._event({"kind": "study_table", "data": data, "artifact_file": artifact_file})

    def discard_trials(self, keep: set[str]) -> None:
        """Delete the runs of trials Tune no longer knows (started after its last state snapshot before the
        driver died; the searcher proposes them again under new ids), so each trial has exactly one run."""
        lost = sorted(key for key in self.store.runs
                      if key != STUDY_KEY and not key.startswith(CONFIRM_PREFIX) and key not in keep)
        if lost:
            self._event({"kind": "trial_discard", "trials": lost})

    def study_tags(self, tags: dict[str, str], metrics: dict[str, float] | None = None) -> None:
        self._event({"kind": "study_tags", "tags": tags, "metrics": metrics or {}})

    def study_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._event({"kind": "study_artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def finish_study(self, status: str | None = None) -> None:
        """End the parent run (again: the report ends it once more, so its duration covers the whole study);
        ``status`` None keeps the one the search ended with."""
        if status is None:
            status = next(reversed([e["status"] for e in self.journal.events("study_end")]), "FINISHED")
        self._event({"kind": "study_end", "status": status})

    def _event(self, event: dict[str, Any]) -> None:
        self.journal.append(event)
        self.flush()

    # ----- sending ------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return self.journal.pending

    def _offline_message(self, exc: Exception) -> str:
        kept = f"The study goes on; results are kept in {self.journal.path}"
        if self.uri.startswith("sqlite:"):  # a file, not a server: it will not come back by itself
            return (f"MLflow's store {self.uri} cannot be used ({type(exc).__name__}: {exc}). {kept}. Once it is "
                    "fixed (space freed on a full disk; a damaged or half-made store deleted, to be rebuilt from "
                    f"the journal), `study sync {self.study_dir}` sends them.")
        return (f"MLflow at {self.uri} is not reachable ({type(exc).__name__}: {exc}). {kept} and sent when the "
                f"server is back, or by `study sync {self.study_dir}`.")

    def flush(self, force: bool = False) -> bool:
        """Send every journalled event not yet in MLflow. Returns True when nothing is left to send."""
        if self.pending == 0 and not force:
            return True
        # Forced (``study sync``) with nothing pending, it still connects: a store that lost the study's runs
        # (mlflow.db deleted) is rebuilt, as ``study report`` does (issue 33, item 2).
        if not force and self._offline_since is not None and time.time() - self._offline_since < RETRY_SECONDS:
            return False
        t0 = time.perf_counter()
        try:
            if self.store.connect():
                log.warning("the MLflow store at %s no longer holds study %s's runs (deleted or replaced?): "
                            "rebuilding them from %s", self.uri, self.study_name, self.journal.path)
                self.journal.rewind()
            lines = self.journal.unsent()
            for number, line, event in lines:
                if event is None:  # a torn or garbled line: not a server problem, and it must not block the rest
                    log.warning("%s line %d is not a journal event (torn by a kill or a full disk?); skipped: %r",
                                self.journal.path, number, line[:120])
                else:
                    self.store.send(event)
                self.journal.mark_sent(line)
                self.events_sent += 1
        except Exception as exc:  # any transport or server error: keep the journal, retry later
            self._offline_since = time.time()
            if not self._warned:
                warnings.warn(self._offline_message(exc), RuntimeWarning, stacklevel=3)
                self._warned = True
            return False
        finally:
            self.seconds_in_mlflow += time.perf_counter() - t0
        if self._offline_since is not None:
            log.warning("MLflow at %s is reachable again; %d journalled events sent", self.uri, len(lines))
        self._offline_since = None
        return True


def log_confirm_runs(spec: StudySpec, paths: StudyPaths, tracker) -> int:
    """Each confirm run not yet in MLflow as a child run of the study's parent: its searched parameters
    (only those active for its configuration), seed and budget; its test scores; as artifacts its result
    (per-image scores and captions), its per-image scores as CSV and its checkpoint. Returns how many were new."""
    import pandas as pd

    from study.records import missing
    from study.records.run_results import read_confirm_results

    new = 0
    for name, result in read_confirm_results(paths).items():
        if CONFIRM_PREFIX + name in tracker.confirm_logged:  # journalled before: only new runs are logged
            continue
        path, config = paths.confirm_result(name), result.config
        params = {k: config[k] for k, p in spec.space.items() if k in config and p.matches(config)}
        # seed: the run's seed index (the -s<k> of its name, the frames' seed column); torch_seed: what torch was
        # seeded with (1000 + k, see confirm_configs).
        params.update(**result.identity(), torch_seed=config.get("seed"), epochs=config.get("epochs"),
                      beam_size=config.get("beam_size"), params=result.params)
        metrics = {f"test_{k}": v for k, v in result.scores.items()}
        metrics.update(train_seconds=result.train_seconds, seconds=result.seconds)
        per_image = pd.DataFrame({m: pd.Series(d) for m, d in result.per_image.items()})
        per_image.index.name = "image_id"
        csv = path.with_suffix(".per_image.csv")
        per_image.sort_index(key=lambda ids: ids.astype(int)).to_csv(csv)
        artifacts = [path, csv] + [p for p in [path.with_suffix(".pt")] if p.exists()]
        note = (f"Confirm run: the search's rank-{result.config_rank} {result.method} configuration retrained "
                f"with seed {result.seed} (torch seed {config.get('seed')}) for {config.get('epochs')} epochs, then "
                f"the test split captioned with "
                f"beam {config.get('beam_size')} and scored with the full coco-caption suite (study report).")
        new += tracker.confirm_run(name, params, {k: v for k, v in metrics.items() if not missing(v)}, artifacts,
                                   history=result.history, span=(result.started_ms, result.ended_ms), note=note,
                                   arm=result.method)
    return new
