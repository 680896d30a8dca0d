"""Every MLflow call of the project lives here.

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
import json
import logging
import os
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from study.files import atomic_write_json
from study.journal import Journal
from study.paths import StudyPaths, sqlite_uri  # noqa: F401  (sqlite_uri: the MLflow URI of a study's own store)

log = logging.getLogger(__name__)

# Fail fast against a dead server instead of MLflow's default minutes of retries; the journal covers us.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

RETRY_SECONDS = 30.0
STATUS_TO_MLFLOW = {"completed": "FINISHED", "stopped": "FINISHED", "errored": "FAILED", "killed": "KILLED"}


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


# Seconds and throughput go under MLflow's system/ prefix: the run page's "Model metrics" tab then holds the scores
# and losses alone (a prefix of our own, time/, was drawn as a section above them), and the timings sit in
# "System metrics". The epoch is every metric's step, not a metric of its own.
TIMINGS = frozenset({"train_seconds", "epoch_seconds", "data_seconds", "val_loss_seconds", "decode_seconds",
                     "metric_seconds", "tokens_per_second", "seconds"})


def mlflow_metric(name: str) -> str | None:
    """The MLflow name of a reported metric: ``system/<name>`` for timings, None for ``epoch`` (the step)."""
    if name == "epoch":
        return None
    return f"system/{name}" if name in TIMINGS else name


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


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
        self.runs_file = paths.mlflow_runs
        self.runs: dict[str, str] = json.loads(self.runs_file.read_text()) if self.runs_file.exists() else {}
        # Confirm runs journalled already (a re-run adds only new ones).
        self.confirm_logged: set[str] = {event["key"] for event in self.journal.events("confirm_run")}
        # The newest epoch journalled for each trial, across drivers: a resumed trial tells Tune its restored
        # epoch again (its result may not have reached the killed driver), and it must not be logged twice.
        self.last_step: dict[str, int] = {}
        for event in self.journal.events("trial_result"):
            self.last_step[event["trial"]] = max(self.last_step.get(event["trial"], 0), event["step"])
        # Standard tags every child run gets (set by start_study: commit, entry point, user).
        self.child_tags: dict[str, str] = {}
        self._offline_since: float | None = None
        self._exp_id: str | None = None  # looked up once per tracker, not per trial
        self._warned = False
        self._checked_store = False  # whether this tracker has seen that the store still holds the parent run
        self._warned_artifacts = False
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

    def trial_started(self, trial_id: str, run_name: str, params: dict[str, Any]) -> None:
        self._event({"kind": "trial_start", "trial": trial_id, "name": run_name, "params": _params(params),
                     "tags": self.child_tags, "time": int(time.time() * 1000)})

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
                    note: str | None = None) -> bool:
        """Journal one confirm run as a child run (``kind=confirm``) with its files as artifacts, its per-epoch
        metrics (``history``, like a search trial's), its real start and end (``span``, epoch milliseconds:
        MLflow's duration) and a ``note`` saying what made it. Returns False, logging nothing, for a run journalled
        before (``study decide`` and a re-run report log only new ones)."""
        key = CONFIRM_PREFIX + name
        if key in self.confirm_logged or key in self.runs:
            return False
        self.confirm_logged.add(key)
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        epochs = [{k: float(v) for k, v in epoch.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                  for epoch in history or []]
        tags = {**self.child_tags, **({"mlflow.note.content": note} if note else {})}
        self._event({"kind": "confirm_run", "key": key, "name": f"confirm-{name}", "params": _params(params),
                     "metrics": clean, "epochs": epochs, "start": span[0], "end": span[1], "tags": tags,
                     "time": int(time.time() * 1000), "artifacts": [str(Path(p).resolve()) for p in artifacts]})
        return True

    # ----- study evaluate (study/cross_dataset.py): a confirm run's scores on another dataset ----------------
    def confirm_metrics(self, name: str, metrics: dict[str, float], *, tag: str, artifacts: list[Path] = (),
                        artifact_path: str | None = None) -> bool:
        """Journal more metrics (and artifacts) for confirm run ``name``, logged before: its scores on another
        dataset, named ``<dataset>/<metric>``. ``tag`` names this addition (dataset, run, their versions): each is
        journalled once. Returns False, logging nothing, for a tag journalled before."""
        if not hasattr(self, "_confirm_metrics_logged"):
            self._confirm_metrics_logged = {e["tag"] for e in self.journal.events("confirm_metrics")}
        if tag in self._confirm_metrics_logged:
            return False
        self._confirm_metrics_logged.add(tag)
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._event({"kind": "confirm_metrics", "key": CONFIRM_PREFIX + name, "name": f"confirm-{name}", "tag": tag,
                     "metrics": clean, "time": int(time.time() * 1000), "artifact_path": artifact_path,
                     "artifacts": [str(Path(p).resolve()) for p in artifacts]})
        return True

    def _send_confirm_metrics(self, client, event: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        run_id = self.runs.get(event["key"]) or self._run_by_tags(client, "confirm", event["name"])
        if run_id is None:  # its confirm_run event comes first in the journal; a missing run is not a server problem
            log.warning("no MLflow confirm run %s for the metrics %s: not sent", event["name"],
                        sorted(event["metrics"]))
            return
        client.log_batch(run_id, metrics=[Metric(k, v, event["time"], 0) for k, v in event["metrics"].items()])
        for path in map(Path, event["artifacts"]):
            if path.exists() and self._artifacts_here(client, run_id):
                client.log_artifact(run_id, str(path), event.get("artifact_path"))

    def study_table(self, data: dict[str, list], artifact_file: str) -> None:
        """A table artifact on the parent (``mlflow.log_table``: the UI's artifact view shows it as a table)."""
        self._event({"kind": "study_table", "data": data, "artifact_file": artifact_file})

    def discard_trials(self, keep: set[str]) -> None:
        """Delete the runs of trials Tune no longer knows (started after its last state snapshot before the
        driver died; the searcher proposes them again under new ids), so each trial has exactly one run."""
        lost = sorted(k for k in self.runs if k != "__study__" and not k.startswith(CONFIRM_PREFIX) and k not in keep)
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

    def flush(self, force: bool = False) -> bool:
        """Send every journalled event not yet in MLflow. Returns True when nothing is left to send."""
        if self.pending == 0:
            return True
        if not force and self._offline_since is not None and time.time() - self._offline_since < RETRY_SECONDS:
            return False
        t0 = time.perf_counter()
        try:
            client = _client(self.uri)
            self._rebuild_if_store_lost(client)
            lines = self.journal.unsent()
            for number, line, event in lines:
                if event is None:  # a torn or garbled line: not a server problem, and it must not block the rest
                    log.warning("%s line %d is not a journal event (torn by a kill or a full disk?); skipped: %r",
                                self.journal.path, number, line[:120])
                else:
                    self._send(client, event)
                self.journal.mark_sent(line)
                self.events_sent += 1
        except Exception as exc:  # any transport or server error: keep the journal, retry later
            self._offline_since = time.time()
            if not self._warned:
                warnings.warn(
                    f"MLflow at {self.uri} is not reachable ({type(exc).__name__}: {exc}). The study goes on; "
                    f"results are kept in {self.journal.path} and sent when the server is back, or by "
                    f"`study sync {self.study_dir}`.", RuntimeWarning, stacklevel=3)
                self._warned = True
            return False
        finally:
            self.seconds_in_mlflow += time.perf_counter() - t0
        if self._offline_since is not None:
            log.warning("MLflow at %s is reachable again; %d journalled events sent", self.uri, len(lines))
        self._offline_since = None
        return True

    def _rebuild_if_store_lost(self, client) -> None:
        """When the store no longer holds the study's parent run (``mlflow.db`` deleted, a new server), send the
        whole journal again: it is the source of truth, and every send finds or makes its run afresh."""
        from mlflow.exceptions import MlflowException

        parent = self.runs.get("__study__")
        if parent is None or self._checked_store:
            return
        try:
            client.get_run(parent)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("the MLflow store at %s no longer holds study %s's runs (deleted or replaced?): rebuilding "
                        "them from %s", self.uri, self.study_name, self.journal.path)
            self.runs = {}
            self._save_runs()
            self.journal.rewind()
            self._exp_id = None
        self._checked_store = True

    def _experiment_id(self, client) -> str:
        if self._exp_id is not None:
            return self._exp_id
        exp = client.get_experiment_by_name(self.experiment)
        if exp is not None:
            self._exp_id = exp.experiment_id
            return self._exp_id
        artifacts = None
        if "://" not in self.uri or self.uri.startswith("sqlite:"):
            artifacts = (self.study_dir / "mlartifacts").resolve().as_uri()
        self._exp_id = client.create_experiment(self.experiment, artifact_location=artifacts)
        return self._exp_id

    def _remember(self, key: str, run_id: str) -> None:
        self.runs[key] = run_id
        self._save_runs()

    def _forget(self, key: str) -> None:
        self.runs.pop(key, None)
        self._save_runs()

    def _save_runs(self) -> None:
        atomic_write_json(self.runs_file, self.runs, indent=1)

    def _run_by_trial_tag(self, client, key: str) -> str | None:
        """The active run of trial ``key`` in this study, found by its tags: a driver killed between creating a
        run and writing its id to ``mlflow_runs.json`` leaves one that only its tags name."""
        runs = client.search_runs([self._experiment_id(client)], max_results=1,
                                  filter_string=f"tags.trial_id = '{key}' and tags.study = '{self.study_name}'")
        return runs[0].info.run_id if runs else None

    def _artifacts_here(self, client, run_id: str) -> bool:
        """Whether the run's artifacts may be written: not when they live in a local folder outside this study's
        (a copied study folder: MLflow keeps the absolute artifact location of the store it was made in, the
        original's ``mlartifacts``, and a copy must never write into the original). Said once per tracker."""
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        uri = client.get_run(run_id).info.artifact_uri
        parsed = urlparse(uri)
        if parsed.scheme not in ("", "file"):
            return True  # a server's or a bucket's artifact store
        where = Path(url2pathname(parsed.path)).resolve()
        home = self.study_dir.resolve()
        if where == home or home in where.parents:
            return True
        if not self._warned_artifacts:
            log.warning("this study folder is a copy: its MLflow runs keep their artifacts in %s, outside it, so "
                        "this copy logs no artifacts there (its files are in %s)", where, home)
            self._warned_artifacts = True
        return False

    def _run_by_tags(self, client, kind: str, run_name: str | None = None) -> str | None:
        """This study's active run of ``kind`` (and name): a second sender finds what the first one made."""
        query = f"tags.study = '{self.study_name}' and tags.kind = '{kind}'"
        if run_name is not None:
            query += f" and attributes.run_name = '{run_name}'"
        runs = client.search_runs([self._experiment_id(client)], filter_string=query, max_results=1)
        return runs[0].info.run_id if runs else None

    def _send(self, client, event: dict[str, Any]) -> None:
        """Send one journalled event: ``_send_<kind>`` does the MLflow calls of each kind."""
        handler = getattr(self, f"_send_{event['kind']}", None)
        if handler is None:  # written by another version of the platform: not a server problem, so not fatal
            log.warning("journal event of unknown kind %r not sent to MLflow", event["kind"])
            return
        handler(client, event)

    def _send_study_start(self, client, event: dict[str, Any]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag, Param, RunTag

        parent = self.runs.get("__study__") or self._run_by_tags(client, "study")
        if parent is not None and "__study__" not in self.runs:
            self._remember("__study__", parent)  # made by another sender that had not written mlflow_runs.json
        if parent is None:
            run = client.create_run(self._experiment_id(client), run_name=self.study_name,
                                    tags={"study": self.study_name, "kind": "study", **event["tags"]})
            parent = run.info.run_id
            self._remember("__study__", parent)
            client.log_batch(parent, params=[Param(k, v) for k, v in event["params"].items()])
            if event.get("spec"):
                client.log_text(parent, event["spec"], "spec.yaml")
        else:  # a resume: the same parent run goes on
            client.update_run(parent, status="RUNNING")
            client.log_batch(parent, tags=[RunTag("resumed", "true")] + [
                RunTag(k, v) for k, v in event["tags"].items() if k.startswith("mlflow.")])
        # Also on a resume whose first attempt failed after creating the run (or a study from before inputs).
        if event.get("dataset") and not client.get_run(parent).inputs.dataset_inputs:
            ds = event["dataset"]
            # MLflow allows 36 characters of digest; the full fingerprint is the dataset_fingerprint tag.
            client.log_inputs(parent, datasets=[DatasetInput(
                Dataset(name=ds["name"], digest=ds["digest"][:36], source_type="local", source=ds["source"]),
                tags=[InputTag("mlflow.data.context", "training")])])

    def _send_trial_start(self, client, event: dict[str, Any]) -> None:
        from mlflow.entities import Param

        key = event["trial"]
        if key not in self.runs and (found := self._run_by_trial_tag(client, key)) is not None:
            self._remember(key, found)  # created by a driver killed before it could remember the id
        if key in self.runs:  # resumed or retried trial: same run, no duplicate
            client.update_run(self.runs[key], status="RUNNING")
            return
        run = client.create_run(
            self._experiment_id(client), run_name=event["name"], start_time=event.get("time"),
            tags={"mlflow.parentRunId": self.runs["__study__"], "study": self.study_name, "kind": "trial",
                  "trial_id": key, **event.get("tags", {})})
        self._remember(key, run.info.run_id)
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in event["params"].items()])

    def _send_trial_result(self, client, event: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param

        run_id = self.runs[event["trial"]]
        metrics = {mlflow_metric(k): v for k, v in event["metrics"].items() if mlflow_metric(k)}
        client.log_batch(run_id, metrics=[Metric(k, v, event["time"], event["step"]) for k, v in metrics.items()],
                         params=[Param(k, v) for k, v in event.get("params", {}).items()])

    def _send_trial_end(self, client, event: dict[str, Any]) -> None:
        from mlflow.entities import Metric, RunTag

        run_id = self.runs.get(event["trial"])
        if run_id is None:
            return
        tags = [RunTag("status", event["status"])]
        if event.get("reason"):  # an error is an error; ASHA stopping a trial is not
            key = "error" if event["status"] == "errored" else "status_reason"
            tags.append(RunTag(key, event["reason"][:5000]))
        now = int(time.time() * 1000)
        client.log_batch(run_id, tags=tags, metrics=[Metric(k, float(v), now, 0)
                                                     for k, v in event.get("summary", {}).items()])
        client.set_terminated(run_id, STATUS_TO_MLFLOW.get(event["status"], "FINISHED"), end_time=event.get("time"))

    def _send_trial_discard(self, client, event: dict[str, Any]) -> None:
        for key in event["trials"]:
            run_id = self.runs.get(key) or self._run_by_trial_tag(client, key)
            if run_id is None:
                continue
            if client.get_run(run_id).info.lifecycle_stage == "active":  # a replay may find it deleted
                client.set_tag(run_id, "status", "discarded")
                client.set_terminated(run_id, "KILLED")
                client.delete_run(run_id)  # soft delete: hidden from the leaderboard, kept in the store
            self._forget(key)  # a later resume must not discard (or close) it again

    def _send_study_tags(self, client, event: dict[str, Any]) -> None:
        from mlflow.entities import Metric, RunTag

        parent = self.runs["__study__"]
        client.log_batch(parent, tags=[RunTag(k, str(v)) for k, v in event["tags"].items()],
                         metrics=[Metric(k, float(v), int(time.time() * 1000), 0)
                                  for k, v in event["metrics"].items()])

    def _send_confirm_run(self, client, event: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param

        key = event["key"]
        run_id = self.runs.get(key) or self._run_by_tags(client, "confirm", event["name"])
        if run_id is not None and client.get_run(run_id).info.status == "FINISHED":
            return  # logged before (a replayed journal)
        if run_id is None:
            run = client.create_run(
                self._experiment_id(client), run_name=event["name"], start_time=event.get("start"),
                tags={"mlflow.parentRunId": self.runs["__study__"], "study": self.study_name, "kind": "confirm",
                      **event.get("tags", {})})
            run_id = run.info.run_id
            self._remember(key, run_id)
        # Re-sent after a crash in between: the same values again, which MLflow accepts.
        end = event.get("end") or event["time"]
        curves = [Metric(mlflow_metric(k), v, end, int(epoch["epoch"])) for epoch in event.get("epochs", [])
                  for k, v in epoch.items() if mlflow_metric(k) and "epoch" in epoch]
        client.log_batch(run_id, params=[Param(k, v) for k, v in event["params"].items()],
                         metrics=[Metric(mlflow_metric(k), v, end, 0) for k, v in event["metrics"].items()
                                  if mlflow_metric(k)] + curves[:900])  # MLflow takes 1000 entries a batch
        if curves[900:]:
            client.log_batch(run_id, metrics=curves[900:])
        for path in map(Path, event["artifacts"]):
            if path.exists() and self._artifacts_here(client, run_id):
                client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, "FINISHED", end_time=event.get("end"))

    def _send_study_table(self, client, event: dict[str, Any]) -> None:
        if self._artifacts_here(client, self.runs["__study__"]):
            client.log_table(self.runs["__study__"], event["data"], event["artifact_file"])

    def _send_study_artifact(self, client, event: dict[str, Any]) -> None:
        path = Path(event["path"])
        if not self._artifacts_here(client, self.runs["__study__"]):
            return
        if path.is_dir():
            client.log_artifacts(self.runs["__study__"], str(path), event.get("artifact_path"))
        elif path.exists():
            client.log_artifact(self.runs["__study__"], str(path), event.get("artifact_path"))

    def _send_study_end(self, client, event: dict[str, Any]) -> None:
        parent = self.runs.get("__study__")
        # Close any trial run left RUNNING (a trial that never got its end event, e.g. a killed driver).
        for key, run_id in self.runs.items():
            if key == "__study__":
                continue
            run = client.get_run(run_id)
            if run.info.status == "RUNNING" and run.info.lifecycle_stage == "active":
                client.set_tag(run_id, "status", "killed")
                client.set_terminated(run_id, "KILLED")
        if parent is not None:
            client.set_terminated(parent, event["status"])


def study_runs(uri: str, experiment: str) -> tuple[Any, Any]:
    """(parent run, DataFrame of trial runs) of a study's experiment, newest parent first."""
    import mlflow

    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment named {experiment!r} at {uri}")
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_ids=[exp.experiment_id], max_results=50000)
    parents = runs[runs.get("tags.kind") == "study"] if "tags.kind" in runs else runs.iloc[0:0]
    trials = runs[runs.get("tags.kind") == "trial"] if "tags.kind" in runs else runs.iloc[0:0]
    return parents, trials


def confirm_runs(uri: str, experiment: str) -> Any:
    """DataFrame of a study's confirm runs (``tags.kind == "confirm"``) in MLflow."""
    import mlflow

    exp = _client(uri).get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment named {experiment!r} at {uri}")
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_ids=[exp.experiment_id], max_results=50000)
    return runs[runs.get("tags.kind") == "confirm"] if "tags.kind" in runs else runs.iloc[0:0]


def get_run_tags(uri: str, run_id: str) -> dict[str, str]:
    return dict(_client(uri).get_run(run_id).data.tags)
