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
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Fail fast against a dead server instead of MLflow's default minutes of retries; the journal covers us.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

RETRY_SECONDS = 30.0
STATUS_TO_MLFLOW = {"completed": "FINISHED", "stopped": "FINISHED", "errored": "FAILED", "killed": "KILLED"}


def sqlite_uri(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def git_commit() -> str:
    """The project's git commit, or 'unknown' outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


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
        self.journal = self.study_dir / "tracking_journal.jsonl"
        self.sent_file = self.study_dir / "tracking_sent.json"
        self.runs_file = self.study_dir / "mlflow_runs.json"
        self.runs: dict[str, str] = json.loads(self.runs_file.read_text()) if self.runs_file.exists() else {}
        sent = json.loads(self.sent_file.read_text()) if self.sent_file.exists() else {}
        self._sent = sent.get("sent", 0)
        self._sent_offset = sent.get("offset", 0)  # byte offset of the first unsent event in the journal
        lines = self.journal.read_bytes().splitlines() if self.journal.exists() else []
        self._written = len(lines)
        # The newest epoch journalled for each trial, across drivers: a resumed trial tells Tune its restored
        # epoch again (its result may not have reached the killed driver), and it must not be logged twice.
        self.last_step: dict[str, int] = {}
        for line in lines:
            if b'"trial_result"' in line:
                event = json.loads(line)
                self.last_step[event["trial"]] = max(self.last_step.get(event["trial"], 0), event["step"])
        self._offline_since: float | None = None
        self._exp_id: str | None = None  # looked up once per tracker, not per trial
        self._warned = False
        self.seconds_in_mlflow = 0.0
        self.events_sent = 0

    # ----- events (journal first, then send) -----------------------------------------------------------
    def start_study(self, params: dict[str, Any], tags: dict[str, str], spec_text: str | None = None) -> None:
        self._event({"kind": "study_start", "params": _params(params), "tags": tags, "spec": spec_text})

    def trial_started(self, trial_id: str, run_name: str, params: dict[str, Any]) -> None:
        self._event({"kind": "trial_start", "trial": trial_id, "name": run_name, "params": _params(params)})

    def trial_result(self, trial_id: str, metrics: dict[str, float], step: int) -> bool:
        """Journal (and send) one epoch's metrics. Returns False, logging nothing, for an epoch already logged."""
        if int(step) <= self.last_step.get(trial_id, 0):
            return False
        self.last_step[trial_id] = int(step)
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._event({"kind": "trial_result", "trial": trial_id, "metrics": clean, "step": int(step),
                     "time": int(time.time() * 1000)})
        return True

    def trial_finished(self, trial_id: str, status: str, reason: str | None = None) -> None:
        self._event({"kind": "trial_end", "trial": trial_id, "status": status, "reason": reason})

    def discard_trials(self, keep: set[str]) -> None:
        """Delete the runs of trials Tune no longer knows (started after its last state snapshot before the
        driver died; the searcher proposes them again under new ids), so each trial has exactly one run."""
        lost = sorted(k for k in self.runs if k != "__study__" and k not in keep)
        if lost:
            self._event({"kind": "trial_discard", "trials": lost})

    def study_tags(self, tags: dict[str, str], metrics: dict[str, float] | None = None) -> None:
        self._event({"kind": "study_tags", "tags": tags, "metrics": metrics or {}})

    def study_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._event({"kind": "study_artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def finish_study(self, status: str = "FINISHED") -> None:
        self._event({"kind": "study_end", "status": status})

    def _event(self, event: dict[str, Any]) -> None:
        with self.journal.open("a") as fh:
            fh.write(json.dumps(event) + "\n")
        self._written += 1
        self.flush()

    # ----- sending ------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return self._written - self._sent

    def flush(self, force: bool = False) -> bool:
        """Send every journalled event not yet in MLflow. Returns True when nothing is left to send."""
        if self.pending == 0:
            return True
        if not force and self._offline_since is not None and time.time() - self._offline_since < RETRY_SECONDS:
            return False
        t0 = time.perf_counter()
        try:
            with self.journal.open("rb") as fh:  # read only what was not sent yet
                fh.seek(self._sent_offset)
                lines = fh.readlines()
            client = _client(self.uri)
            for line in lines:
                self._send(client, json.loads(line))
                self._sent += 1
                self._sent_offset += len(line)
                self.events_sent += 1
                self.sent_file.write_text(json.dumps({"sent": self._sent, "offset": self._sent_offset}))
        except Exception as exc:  # any transport or server error: keep the journal, retry later
            self._offline_since = time.time()
            if not self._warned:
                warnings.warn(
                    f"MLflow at {self.uri} is not reachable ({type(exc).__name__}: {exc}). The study goes on; "
                    f"results are kept in {self.journal} and sent when the server is back, or by "
                    f"`study sync {self.study_dir}`.", RuntimeWarning, stacklevel=3)
                self._warned = True
            return False
        finally:
            self.seconds_in_mlflow += time.perf_counter() - t0
        if self._offline_since is not None:
            log.warning("MLflow at %s is reachable again; %d journalled events sent", self.uri, len(lines))
        self._offline_since = None
        return True

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
        tmp = self.runs_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.runs, indent=1))
        os.replace(tmp, self.runs_file)

    def _send(self, client, event: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind = event["kind"]
        if kind == "study_start":
            parent = self.runs.get("__study__")
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
                client.set_tag(parent, "resumed", "true")
        elif kind == "trial_start":
            key = event["trial"]
            if key in self.runs:  # resumed or retried trial: same run, no duplicate
                client.update_run(self.runs[key], status="RUNNING")
                return
            run = client.create_run(
                self._experiment_id(client), run_name=event["name"],
                tags={"mlflow.parentRunId": self.runs["__study__"], "study": self.study_name, "kind": "trial",
                      "trial_id": key})
            self._remember(key, run.info.run_id)
            client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in event["params"].items()])
        elif kind == "trial_result":
            run_id = self.runs[event["trial"]]
            client.log_batch(run_id, metrics=[Metric(k, v, event["time"], event["step"])
                                              for k, v in event["metrics"].items()])
        elif kind == "trial_end":
            run_id = self.runs.get(event["trial"])
            if run_id is None:
                return
            tags = [RunTag("status", event["status"])]
            if event.get("reason"):
                tags.append(RunTag("error", event["reason"][:5000]))
            client.log_batch(run_id, tags=tags)
            client.set_terminated(run_id, STATUS_TO_MLFLOW.get(event["status"], "FINISHED"))
        elif kind == "trial_discard":
            for key in event["trials"]:
                run_id = self.runs.get(key)
                if run_id is None:
                    continue
                if client.get_run(run_id).info.lifecycle_stage == "active":  # a replay may find it deleted
                    client.set_tag(run_id, "status", "discarded")
                    client.set_terminated(run_id, "KILLED")
                    client.delete_run(run_id)  # soft delete: hidden from the leaderboard, kept in the store
                self._forget(key)  # a later resume must not discard (or close) it again
        elif kind == "study_tags":
            parent = self.runs["__study__"]
            client.log_batch(parent, tags=[RunTag(k, str(v)) for k, v in event["tags"].items()],
                             metrics=[Metric(k, float(v), int(time.time() * 1000), 0)
                                      for k, v in event["metrics"].items()])
        elif kind == "study_artifact":
            path = Path(event["path"])
            if path.is_dir():
                client.log_artifacts(self.runs["__study__"], str(path), event.get("artifact_path"))
            elif path.exists():
                client.log_artifact(self.runs["__study__"], str(path), event.get("artifact_path"))
        elif kind == "study_end":
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
        else:
            raise ValueError(f"unknown journal event {kind!r}")


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


def get_run_tags(uri: str, run_id: str) -> dict[str, str]:
    return dict(_client(uri).get_run(run_id).data.tags)
