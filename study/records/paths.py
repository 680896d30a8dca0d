"""Where a study's files live: the one place that knows the folder layout.

    <storage>/<name>/                  the study folder (a local folder; see ``StudyPaths.of`` for s3://)
        study.json                     spec file, storage, MLflow store, experiment and the pinned precision
        spec.yaml                      the spec as the study started: what every later stage reads
        driver.lock                    the running driver (study/records/lock.py)
        mlflow.db                      the default MLflow store
        tracking_journal.jsonl         every tracking event, written before MLflow sees it (study/tracking/)
        tracking_sent.json             how far the journal has reached MLflow
        mlflow_runs.json               MLflow run id of each trial and confirm run
        search_time.json               the search's time budget ledger, summed over drivers
        optuna.db                      the searchers' Optuna studies (for optuna-dashboard)
        tune/                          Ray Tune's experiment: one folder per trial, with its checkpoints
        confirm/<method>-r<k>-s<seed>.json (.pt)   each confirm run's scores (and its trained model):
                                       study/records/run_results.py
        decide.json                    the looks of ``study decide`` (study/records/decide_log.py)
        comparator.json                the arm the verdict compares the target with, fixed before any test scoring
        test_split.json                what the confirm stage knew of the data (provenance, gallery): study.records
        evaluate/<name>/               each confirm run scored on another dataset (study/stages/evaluate.py)
        verdict.csv, report/           the verdict table and the report (report/provenance.json: its provenance)
    <storage>/ledger.csv               every scoring of a test split by the studies here (study/records/ledger.py)

Tune's own folder (``tune/``) may live in a bucket (``storage: s3://...``); the rest is the driver's
bookkeeping and always stays on a local disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from study.records.files import atomic_write_json, atomic_write_text


def storage_is_remote(storage: str) -> bool:
    """Whether ``storage`` is a URI (s3://, gs://, ...) rather than a local folder."""
    return "://" in str(storage)


def sqlite_uri(path: Path) -> str:
    """MLflow's URI of a sqlite store file."""
    return f"sqlite:///{Path(path).resolve()}"


class StudyRecordError(ValueError):
    """A study folder's ``study.json`` is missing or damaged."""


@dataclass(frozen=True)
class StudyPaths:
    """The files of one study. ``root`` is the local study folder; ``tune`` is Tune's experiment path (the same
    folder's ``tune/`` for a local study, a URI under the bucket for a remote one)."""

    root: Path
    tune: str

    @classmethod
    def of(cls, storage: str, name: str) -> "StudyPaths":
        """The layout of study ``name`` under ``storage``. A remote study keeps its bookkeeping in ``./runs/<name>``
        on the driver (the journal and locks need a local disk); Tune's state goes to the bucket."""
        base = f"{str(storage).rstrip('/')}/{name}"
        root = Path.cwd() / "runs" / name if storage_is_remote(storage) else Path(storage) / name
        return cls(root, f"{base}/tune")

    @classmethod
    def at(cls, folder: Path) -> "StudyPaths":
        """The layout of a local study folder (Tune's state in its ``tune/``)."""
        return cls(Path(folder), str(Path(folder) / "tune"))

    @property
    def tune_parent(self) -> str:
        """Tune's ``storage_path``: Tune adds the experiment name ``tune``."""
        return self.tune.rsplit("/", 1)[0]

    study_file = property(lambda self: self.root / "study.json")
    spec_copy = property(lambda self: self.root / "spec.yaml")  # the spec as the study started, never rewritten
    lock = property(lambda self: self.root / "driver.lock")
    mlflow_db = property(lambda self: self.root / "mlflow.db")
    journal = property(lambda self: self.root / "tracking_journal.jsonl")
    journal_sent = property(lambda self: self.root / "tracking_sent.json")
    mlflow_runs = property(lambda self: self.root / "mlflow_runs.json")
    search_time = property(lambda self: self.root / "search_time.json")
    optuna_db = property(lambda self: self.root / "optuna.db")
    confirm = property(lambda self: self.root / "confirm")
    decide = property(lambda self: self.root / "decide.json")
    verdict_csv = property(lambda self: self.root / "verdict.csv")
    report = property(lambda self: self.root / "report")
    report_provenance = property(lambda self: self.report / "provenance.json")  # study.records.provenance
    evaluate = property(lambda self: self.root / "evaluate")  # study evaluate: one folder per dataset
    test_split = property(lambda self: self.root / "test_split.json")  # study.records.TestSplitRecord
    comparator = property(lambda self: self.root / "comparator.json")  # the verdict's comparator, fixed before test
    # The test-split ledger beside the studies (study/records/ledger.py): every study under this storage appends to it.
    ledger = property(lambda self: self.root.parent / "ledger.csv")

    def confirm_result(self, run: str) -> Path:
        """``confirm/<run>.json``: one confirm run's scores, per-image scores and captions."""
        return self.confirm / f"{run}.json"

    def confirm_model(self, run: str) -> Path:
        """``confirm/<run>.pt``: the confirm run's trained model (written before its ``.json``)."""
        return self.confirm / f"{run}.pt"

    def confirm_results(self) -> list[Path]:
        """Every finished confirm run's ``.json``, in name order."""
        return sorted(self.confirm.glob("*.json"))

    def tracking_uri(self, configured: str | None) -> str:
        """The study's MLflow store: the one the spec names, else ``mlflow.db`` in the study folder."""
        return configured or sqlite_uri(self.mlflow_db)

    def write_record(self, name: str, spec_path: Path, storage: str, tracking_uri: str, experiment: str,
                     precision: str | None = None) -> Path:
        """``study.json``: how ``study resume/leaderboard/report NAME`` finds the spec, storage and MLflow store.
        The default store is written as ``"tracking_uri": null`` (the ``mlflow.db`` beside the file, wherever the
        folder is moved); only another store is written out. The first call also copies the spec into the folder
        (``spec.yaml``): every later stage reads that copy, so editing the YAML after ``study run`` (what users
        do between studies) never changes what a running or finished study trains and reports. ``precision``:
        what every trial and confirm run of the study uses (``auto`` resolved once, by the first driver)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.spec_copy.exists():
            atomic_write_text(self.spec_copy, Path(spec_path).read_text())
        return atomic_write_json(self.study_file, {
            "name": name, "spec": str(Path(spec_path).resolve()), "storage": storage,
            "tracking_uri": None if tracking_uri == sqlite_uri(self.mlflow_db) else tracking_uri,
            "experiment": experiment, "precision": precision}, indent=2)

    def read_record(self) -> dict[str, Any]:
        """``study.json`` read where the folder is now, not where it was written: ``tracking_uri`` is the folder's
        own ``mlflow.db`` when the record names none, and a local study whose folder was copied or moved gets
        ``storage`` = the folder's parent and, when it was renamed, ``name`` = the folder's name (its MLflow
        ``experiment`` stays the record's), so that every path of the study is inside this folder and a copy
        never writes into the original. Adds ``folder`` (this folder, resolved)."""
        folder = self.root.resolve()
        try:
            info = json.loads(self.study_file.read_text())
            if not isinstance(info, dict):
                raise TypeError(f"a JSON {type(info).__name__}, not an object")
        except FileNotFoundError:
            raise StudyRecordError(f"{self.study_file} does not exist: not a study folder") from None
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
            raise StudyRecordError(
                f"{self.study_file} is damaged ({exc}): it should be the JSON object `study run` wrote, naming the "
                "study's spec, storage, tracking_uri and experiment; restore or rewrite it") from None
        info["folder"] = str(folder)
        info["tracking_uri"] = info.get("tracking_uri") or sqlite_uri(folder / self.mlflow_db.name)
        storage = info.get("storage")
        if (isinstance(storage, str) and not storage_is_remote(storage)
                and (Path(storage) / str(info.get("name"))).resolve() != folder):
            info.setdefault("experiment", info.get("name"))
            info["storage"], info["name"] = str(folder.parent), folder.name
        return info
