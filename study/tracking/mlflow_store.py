"""Every MLflow call of the project lives here: sending journalled events, and reading a study's runs back.

``study.tracking`` records a study's events in its journal; ``MlflowStore.send`` turns one event into MLflow
calls. One parent run per study (tag ``kind=study``), one nested child run per trial (``kind=trial``) and per
confirm run (``kind=confirm``), both tagged with their ``arm``; the experiment's shared view
(study/tracking/mlflow_view.py).
Which run belongs to which trial is remembered in ``mlflow_runs.json`` (keyed by Tune's trial id,
``confirm/<name>`` for confirm runs, ``__study__`` for the parent), and found again by its tags when a driver died
before it could remember it, so a resumed or replayed study never makes a duplicate run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from analysis.metric_table import POINTS, is_score
from study.configure import configure
from study.records.files import atomic_write_json
from study.records.paths import StudyPaths
from study.tracking.journal import read_runs_file
from study.tracking.mlflow_view import EXPERIMENT_NOTE, mlflow_metric, view_tags

log = logging.getLogger(__name__)

STATUS_TO_MLFLOW = {"completed": "FINISHED", "stopped": "FINISHED", "errored": "FAILED", "killed": "KILLED"}
STUDY_KEY = "__study__"  # the parent run's key in mlflow_runs.json

def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _metric(name: str, value: float, timestamp: int, step: int = 0):
    """One MLflow metric; a caption score (or a difference of two) in points, the one scale every place a person or
    a program reads shows (``analysis.metric_table``): the journal keeps the 0..1 scale it was computed on."""
    from mlflow.entities import Metric

    return Metric(name, float(value) * (POINTS if is_score(name) else 1), timestamp, step)


class MlflowStore:
    """One study's runs in one MLflow store: ``send`` makes the MLflow calls of one journalled event."""

    def __init__(self, uri: str, experiment: str, study_name: str, study_dir: Path):
        configure()  # MLflow's retries and logger level (study/configure.py), also for a study used from Python
        self.uri, self.experiment, self.study_name, self.study_dir = uri, experiment, study_name, Path(study_dir)
        self.runs_file = StudyPaths.at(self.study_dir).mlflow_runs
        self.runs: dict[str, str] = read_runs_file(self.runs_file)
        self._client = None
        self._exp_id: str | None = None  # looked up once per store, not per trial
        self._checked_store = False  # whether this store has been seen to still hold the parent run
        self._warned_artifacts = False

    def connect(self) -> bool:
        """Open the client (raises when the server is down). Returns True when the store no longer holds the
        study's parent run (``mlflow.db`` deleted, a new server): the caller then sends the whole journal again,
        the source of truth, and every send finds or makes its run afresh."""
        from mlflow.exceptions import MlflowException

        self._client = self._client or client(self.uri)
        parent = self.runs.get(STUDY_KEY)
        if parent is None or self._checked_store:
            return False
        try:
            self._client.get_run(parent)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
            self.runs, self._exp_id = {}, None
            atomic_write_json(self.runs_file, self.runs, indent=1)
            self._checked_store = True
            return True
        self._checked_store = True
        return False

    def send(self, event: dict[str, Any]) -> None:
        """The MLflow calls of one journalled event, by its kind."""
        match event["kind"]:
            case "study_start":
                self._study_start(event)
            case "trial_start":
                self._trial_start(event)
            case "trial_result":
                self._trial_result(event)
            case "trial_end":
                self._trial_end(event)
            case "trial_discard":
                self._trial_discard(event)
            case "confirm_run":
                self._confirm_run(event)
            case "confirm_metrics":
                self._confirm_metrics(event)
            case "study_tags":
                self._study_tags(event)
            case "study_table" | "study_artifact":
                self._study_artifact(event)
            case "study_end":
                self._study_end(event)
            case kind:  # written by another version of the platform: not a server problem, so not fatal
                log.warning("journal event of unknown kind %r not sent to MLflow", kind)

    # ----- the study's parent run --------------------------------------------------------------------------
    def _study_start(self, event: dict[str, Any]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag, Param, RunTag

        self._share_view(event["params"].get("metric", "val_CIDEr-D"))
        parent = self.runs.get(STUDY_KEY) or self._run_by_tags("study")
        if parent is not None and STUDY_KEY not in self.runs:
            self._remember(STUDY_KEY, parent)  # made by another sender that had not written mlflow_runs.json
        if parent is None:
            run = self._client.create_run(self._experiment_id(), run_name=self.study_name,
                                          tags={"study": self.study_name, "kind": "study", **event["tags"]})
            parent = run.info.run_id
            self._remember(STUDY_KEY, parent)
            self._client.log_batch(parent, params=[Param(k, v) for k, v in event["params"].items()])
            if event.get("spec"):
                self._client.log_text(parent, event["spec"], "spec.yaml")
        else:  # a resume: the same parent run goes on
            self._client.update_run(parent, status="RUNNING")
            self._client.log_batch(parent, tags=[RunTag("resumed", "true")] + [
                RunTag(k, v) for k, v in event["tags"].items() if k.startswith("mlflow.")])
        # Also on a resume whose first attempt failed after creating the run (or a study from before inputs).
        if event.get("dataset") and not self._client.get_run(parent).inputs.dataset_inputs:
            ds = event["dataset"]
            # MLflow allows 36 characters of digest; the full fingerprint is the dataset_fingerprint tag.
            self._client.log_inputs(parent, datasets=[DatasetInput(
                Dataset(name=ds["name"], digest=ds["digest"][:36], source_type="local", source=ds["source"]),
                tags=[InputTag("mlflow.data.context", "training")])])

    def _share_view(self, metric: str) -> None:
        """The experiment's description and its shared view (study/tracking/mlflow_view.py: the columns, every run
        drawn)."""
        for key, value in {**view_tags(metric), "mlflow.note.content": EXPERIMENT_NOTE}.items():
            self._client.set_experiment_tag(self._experiment_id(), key, value)

    def _study_tags(self, event: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.runs[STUDY_KEY], tags=[RunTag(k, str(v)) for k, v in event["tags"].items()],
                               metrics=[_metric(k, v, int(time.time() * 1000))
                                        for k, v in event["metrics"].items()])

    def _study_artifact(self, event: dict[str, Any]) -> None:
        """A file, a folder or (``study_table``) a table as an artifact of the parent run."""
        parent = self.runs[STUDY_KEY]
        if not self._artifacts_here(parent):
            return
        path = Path(event.get("path", ""))
        if event["kind"] == "study_table":
            self._client.log_table(parent, event["data"], event["artifact_file"])
        elif path.is_dir():
            self._client.log_artifacts(parent, str(path), event.get("artifact_path"))
        elif path.exists():
            self._client.log_artifact(parent, str(path), event.get("artifact_path"))

    def _study_end(self, event: dict[str, Any]) -> None:
        # Close any child run left RUNNING (a trial that never got its end event, e.g. a killed driver).
        for key, run_id in self.runs.items():
            if key == STUDY_KEY:
                continue
            run = self._client.get_run(run_id)
            if run.info.status == "RUNNING" and run.info.lifecycle_stage == "active":
                self._client.set_tag(run_id, "status", "killed")
                self._client.set_terminated(run_id, "KILLED")
        if STUDY_KEY in self.runs:
            self._client.set_terminated(self.runs[STUDY_KEY], event["status"])

    # ----- trial runs -------------------------------------------------------------------------------------
    def _trial_start(self, event: dict[str, Any]) -> None:
        from mlflow.entities import Param

        key = event["trial"]
        if key not in self.runs and (found := self._run_by_trial_tag(key)) is not None:
            self._remember(key, found)  # created by a driver killed before it could remember the id
        if key in self.runs:  # resumed or retried trial: same run, no duplicate
            self._client.update_run(self.runs[key], status="RUNNING")
            return
        run = self._client.create_run(
            self._experiment_id(), run_name=event["name"], start_time=event.get("time"),
            tags={"mlflow.parentRunId": self.runs[STUDY_KEY], "study": self.study_name, "kind": "trial",
                  "trial_id": key, **event.get("tags", {})})
        self._remember(key, run.info.run_id)
        self._client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in event["params"].items()])

    def _trial_result(self, event: dict[str, Any]) -> None:
        from mlflow.entities import Param

        metrics = {mlflow_metric(k): v for k, v in event["metrics"].items() if mlflow_metric(k)}
        self._client.log_batch(self.runs[event["trial"]],
                               metrics=[_metric(k, v, event["time"], event["step"]) for k, v in metrics.items()],
                               params=[Param(k, v) for k, v in event.get("params", {}).items()])

    def _trial_end(self, event: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        run_id = self.runs.get(event["trial"])
        if run_id is None:
            return
        tags = [RunTag("status", event["status"])]
        if event.get("reason"):  # an error is an error; ASHA stopping a trial is not
            key = "error" if event["status"] == "errored" else "status_reason"
            tags.append(RunTag(key, event["reason"][:5000]))
        now = int(time.time() * 1000)
        self._client.log_batch(run_id, tags=tags, metrics=[_metric(k, v, now)
                                                           for k, v in event.get("summary", {}).items()])
        self._client.set_terminated(run_id, STATUS_TO_MLFLOW.get(event["status"], "FINISHED"),
                                    end_time=event.get("time"))

    def _trial_discard(self, event: dict[str, Any]) -> None:
        for key in event["trials"]:
            run_id = self.runs.get(key) or self._run_by_trial_tag(key)
            if run_id is None:
                continue
            if self._client.get_run(run_id).info.lifecycle_stage == "active":  # a replay may find it deleted
                self._client.set_tag(run_id, "status", "discarded")
                self._client.set_terminated(run_id, "KILLED")
                self._client.delete_run(run_id)  # soft delete: hidden from the leaderboard, kept in the store
            self._remember(key, None)  # a later resume must not discard (or close) it again

    def _confirm_run(self, event: dict[str, Any]) -> None:
        from mlflow.entities import Param

        key = event["key"]
        run_id = self.runs.get(key) or self._run_by_tags("confirm", event["name"])
        if run_id is not None and key not in self.runs:
            self._remember(key, run_id)  # found by its tags (mlflow_runs.json lost or damaged): the map is rebuilt
        if run_id is not None and self._client.get_run(run_id).info.status == "FINISHED":
            return  # logged before (a replayed journal)
        if run_id is None:
            run = self._client.create_run(
                self._experiment_id(), run_name=event["name"], start_time=event.get("start"),
                tags={"mlflow.parentRunId": self.runs[STUDY_KEY], "study": self.study_name, "kind": "confirm",
                      **event.get("tags", {})})
            run_id = run.info.run_id
            self._remember(key, run_id)
        # Re-sent after a crash in between: the same values again, which MLflow accepts.
        end = event.get("end") or event["time"]
        curves = [_metric(mlflow_metric(k), v, end, int(epoch["epoch"])) for epoch in event.get("epochs", [])
                  for k, v in epoch.items() if mlflow_metric(k) and "epoch" in epoch]
        self._client.log_batch(run_id, params=[Param(k, v) for k, v in event["params"].items()],
                               metrics=[_metric(mlflow_metric(k), v, end) for k, v in event["metrics"].items()
                                        if mlflow_metric(k)] + curves[:900])  # MLflow takes 1000 entries a batch
        if curves[900:]:
            self._client.log_batch(run_id, metrics=curves[900:])
        for path in map(Path, event["artifacts"]):
            if path.exists() and self._artifacts_here(run_id):
                self._client.log_artifact(run_id, str(path))
        self._client.set_terminated(run_id, "FINISHED", end_time=event.get("end"))

    def _confirm_metrics(self, event: dict[str, Any]) -> None:
        """A confirm run's scores on another dataset (``study evaluate``), added to its run."""
        run_id = self.runs.get(event["key"]) or self._run_by_tags("confirm", event["name"])
        if run_id is None:  # its confirm_run event comes first in the journal; a missing run is not a server problem
            log.warning("no MLflow confirm run %s for the metrics %s: not sent", event["name"],
                        sorted(event["metrics"]))
            return
        self._client.log_batch(run_id, metrics=[_metric(k, v, event["time"]) for k, v in event["metrics"].items()])
        for path in map(Path, event["artifacts"]):
            if path.exists() and self._artifacts_here(run_id):
                self._client.log_artifact(run_id, str(path), event.get("artifact_path"))

    # ----- finding runs -----------------------------------------------------------------------------------
    def _experiment_id(self) -> str:
        if self._exp_id is not None:
            return self._exp_id
        exp = self._client.get_experiment_by_name(self.experiment)
        if exp is not None:
            self._exp_id = exp.experiment_id
            return self._exp_id
        artifacts = None
        if "://" not in self.uri or self.uri.startswith("sqlite:"):
            artifacts = (self.study_dir / "mlartifacts").resolve().as_uri()
        self._exp_id = self._client.create_experiment(self.experiment, artifact_location=artifacts)
        return self._exp_id

    def _run_by_trial_tag(self, key: str) -> str | None:
        """The active run of trial ``key`` in this study, found by its tags: a driver killed between creating a
        run and writing its id to ``mlflow_runs.json`` leaves one that only its tags name."""
        runs = self._client.search_runs([self._experiment_id()], max_results=1,
                                        filter_string=f"tags.trial_id = '{key}' and tags.study = '{self.study_name}'")
        return runs[0].info.run_id if runs else None

    def _run_by_tags(self, kind: str, run_name: str | None = None) -> str | None:
        """This study's active run of ``kind`` (and name): a second sender finds what the first one made."""
        query = f"tags.study = '{self.study_name}' and tags.kind = '{kind}'"
        if run_name is not None:
            query += f" and attributes.run_name = '{run_name}'"
        runs = self._client.search_runs([self._experiment_id()], filter_string=query, max_results=1)
        return runs[0].info.run_id if runs else None

    def _artifacts_here(self, run_id: str) -> bool:
        """Whether the run's artifacts may be written: not when they live in a local folder outside this study's
        (a copied study folder: MLflow keeps the absolute artifact location of the store it was made in, the
        original's ``mlartifacts``, and a copy must never write into the original). Said once per store."""
        uri = self._client.get_run(run_id).info.artifact_uri
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

    def _remember(self, key: str, run_id: str | None) -> None:
        """Write down (or, with None, forget) the run of ``key`` in ``mlflow_runs.json``."""
        if run_id is None:
            self.runs.pop(key, None)
        else:
            self.runs[key] = run_id
        atomic_write_json(self.runs_file, self.runs, indent=1)


# ----- reading a study's runs back ------------------------------------------------------------------------------
def experiment_id(uri: str, experiment: str) -> str | None:
    """The experiment's id (for the UI's address), or None when the store cannot say (a server that is down)."""
    try:
        found = client(uri).get_experiment_by_name(experiment)
    except Exception:  # the address is only a convenience
        return None
    return found.experiment_id if found else None


def _runs_of_kinds(uri: str, experiment: str, *kinds: str) -> list[Any]:
    """A DataFrame of the experiment's runs tagged ``kind`` for each of ``kinds``."""
    import mlflow

    exp = client(uri).get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment named {experiment!r} at {uri}")
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_ids=[exp.experiment_id], max_results=50000)
    return [runs[runs.get("tags.kind") == kind] if "tags.kind" in runs else runs.iloc[0:0] for kind in kinds]


def study_runs(uri: str, experiment: str) -> tuple[Any, Any]:
    """(parent run, DataFrame of trial runs) of a study's experiment."""
    return tuple(_runs_of_kinds(uri, experiment, "study", "trial"))


def confirm_runs(uri: str, experiment: str) -> Any:
    """DataFrame of a study's confirm runs (``tags.kind == "confirm"``) in MLflow."""
    return _runs_of_kinds(uri, experiment, "confirm")[0]


def get_run_tags(uri: str, run_id: str) -> dict[str, str]:
    return dict(client(uri).get_run(run_id).data.tags)
