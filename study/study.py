"""A study: its spec, its folder (``StudyPaths``), its tracker, and its stages.

    search()   Ray Tune + Optuna + ASHA over the spec's space        -> Tune's trial folders  (study.tuning)
    confirm()  the best configurations retrained with several seeds  -> confirm/*.json       (study.confirm)
    report()   verdict with intervals, figures, MLflow evidence      -> report/, verdict.csv (analysis, study.confirm)
    decide()   more seeds under a sequential plan, then report()     -> decide.json          (study.deciding)

Each stage reads what the one before wrote, from the study folder, so each can run (and resume) on its own.
The ``study`` command and the Python API (``study.load(name)``) are thin shells over this class; the API's
readers (``trials()``, ``leaderboard()``, ``confirm_runs()``, ``verdict()``, ...) return pandas frames and
need no Ray, no MLflow and no GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pandas as pd

from study.paths import StudyPaths, storage_is_remote
from study.spec import StudySpec

if TYPE_CHECKING:
    from study.data.prepare import PreparedData
    from study.lock import StudyLock
    from study.tracking import StudyTracker
    from study.tuning import StudyOutcome


class StudyNotFound(FileNotFoundError):
    """No ``study.json`` where a study was looked for."""


@dataclass
class Study:
    spec: StudySpec
    spec_path: Path
    paths: StudyPaths
    _data: "PreparedData | None" = field(default=None, repr=False)

    # ----- finding a study -----------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: StudySpec, spec_path: Path) -> "Study":
        return cls(spec, Path(spec_path), StudyPaths.of(spec.storage, spec.name))

    @classmethod
    def open(cls, study: str | Path, storage: str | Path | None = None, *, check_paths: bool = True) -> "Study":
        """A study by name (under ``storage``, default ``./runs``) or by its folder, with the spec, storage and
        MLflow store it ran with. Raises ``StudyNotFound``, ``paths.StudyRecordError`` (a damaged study.json) or
        ``ConfigError`` (its spec no longer validates)."""
        from study.spec import load_spec

        candidates = [Path(study).expanduser(), Path(storage or "runs").expanduser() / str(study)]
        for folder in candidates:
            if (folder / "study.json").is_file():
                paths = StudyPaths.at(folder)
                record = paths.read_record()
                original = Path(record["spec"])
                # The study's own copy when it has one (studies started before it existed read the original).
                source = paths.spec_copy if paths.spec_copy.is_file() else original
                if source != original:
                    _warn_if_edited(original, source)
                spec = load_spec(source, storage=record["storage"], name=record["name"], base=original.parent,
                                 tracking_uri=record["tracking_uri"], check_paths=check_paths)
                if record.get("experiment") and record["experiment"] != spec.name:  # a renamed copy: same store
                    spec = spec.model_copy(update={"tracking": spec.tracking.model_copy(
                        update={"experiment": record["experiment"]})})
                # Studies begun before the precision setting trained in fp32 on the CPU: keep them so.
                return cls.from_spec(spec.with_precision(record.get("precision") or "fp32"), original)
        raise StudyNotFound(f"no study {str(study)!r}: looked for study.json in "
                            f"{', '.join(str(c) for c in candidates)}")

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def spec_text(self) -> str:
        """The spec the study runs with: its own copy (``spec.yaml`` in the folder), else the original file."""
        copy = self.paths.spec_copy
        return (copy if copy.is_file() else self.spec_path).read_text()

    @property
    def tracking_uri(self) -> str:
        return self.paths.tracking_uri(self.spec.tracking.uri)

    @property
    def experiment(self) -> str:
        return self.spec.tracking.experiment or self.spec.name

    def experiment_id(self) -> str | None:
        """The study's MLflow experiment id (for the UI's address), or None when the store cannot say."""
        try:
            from mlflow.tracking import MlflowClient

            found = MlflowClient(self.tracking_uri).get_experiment_by_name(self.experiment)
        except Exception:  # a server that is down: the address is only a convenience
            return None
        return found.experiment_id if found else None

    def tracker(self) -> "StudyTracker":
        from study.tracking import StudyTracker

        return StudyTracker(self.tracking_uri, self.experiment, self.name, self.paths.root)

    def exists(self) -> bool:
        """Whether a study of this name was started in this storage: its study.json, or Tune state."""
        from study.tuning.trials import experiment_states

        return self.paths.study_file.is_file() or bool(experiment_states(self.spec)[1])

    def search_started(self) -> bool:
        """Whether Tune has state for this study (always True for a bucket: nothing cheap to look at)."""
        return storage_is_remote(self.spec.storage) or (self.paths.root / "tune").is_dir()

    def renamed(self, name: str) -> "Study":
        return Study.from_spec(self.spec.model_copy(update={"name": name}), self.spec_path)

    def fresh(self) -> "Study":
        """This spec as the first of ``NAME-2``, ``NAME-3``, ... that no study uses yet (``study run --new``)."""
        for n in range(2, 10_000):
            candidate = self.renamed(f"{self.name}-{n}")
            if not candidate.exists() and not candidate.paths.lock.exists():
                return candidate
        raise RuntimeError(f"studies {self.name}-2 ... {self.name}-9999 all exist")

    def resume_command(self) -> str:
        """The command that continues this study: by name when it lives in ./runs, else by its folder."""
        root = self.paths.root
        if storage_is_remote(self.spec.storage) or root.parent.resolve() != (Path.cwd() / "runs").resolve():
            return f"study resume {root}"
        return f"study resume {self.name}"

    def lock(self, command: str) -> "StudyLock":
        """This driver's hold on the study (study/lock.py); raises ``StudyInUse`` naming the holder."""
        from study.lock import acquire

        return acquire(self.paths.root, command)

    # ----- the stages ----------------------------------------------------------------------------------
    def data(self, *, progress: bool = True) -> "PreparedData":
        """The features and tokenised captions every stage reads (prepared once per Study object)."""
        from study.data.prepare import prepare_for_spec
        from study.provenance import check_dataset_unchanged

        if self._data is None:
            data = prepare_for_spec(self.spec, progress=progress)
            check_dataset_unchanged(self.paths, data.info)
            self._data = data
        return self._data

    def search(self, *, resume: bool = False, address: str | None = None, max_concurrent: int | None = None,
               echo: Callable[[str], None] | None = None, progress: bool = True, verbose: int = 0) -> "StudyOutcome":
        """Run (or continue) the search; Ray is shut down after it."""
        from study import tuning

        self.pin_precision()
        try:
            return tuning.run_study(self.spec, self.spec_path, address=address, max_concurrent=max_concurrent,
                                    resume=resume, echo=echo, progress=progress, verbose=verbose)
        finally:
            tuning.shutdown()

    def pin_precision(self) -> str:
        """Resolve ``precision: auto`` once, in this driver, for the device the trials use (CUDA when the spec asks
        for GPUs, else this CPU), so that every trial and confirm run of the study uses the same precision
        whichever node runs it; ``study.json`` keeps it for ``study resume`` and the later stages."""
        from study.precision import resolve

        precision = resolve(self.spec.fixed.get("precision", "auto"), "cuda" if self.spec.resources.gpu else "cpu")
        self.spec = self.spec.with_precision(precision)
        return precision

    def tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(trials, history) of the search as the stages read them (``study.tuning.trials``)."""
        from study.tuning.trials import load_trial_tables

        return load_trial_tables(self.spec)

    def confirm(self, *, address: str | None = None, progress: bool = True,
                runs: list[tuple[str, int, int, Any]] | None = None) -> Path:
        """Retrain the best configurations with seeds and score the test split (resumable: finished runs are
        kept). ``runs`` (method, rank, seed, config) defaults to the spec's confirm stage."""
        from study import tuning
        from study.confirm import run_confirm

        trials, _ = self.tables()
        data = self.data(progress=progress)
        tuning.ensure_ray(address)
        try:
            return run_confirm(self.spec, self.paths, trials, data, progress=progress, runs=runs)
        finally:
            tuning.shutdown()

    def report(self, *, console: Any = None, address: str | None = None, progress: bool = True) -> Path:
        """The confirm stage if needed, then the verdict, the report and its evidence in MLflow."""
        from study.deciding import write_report

        self.confirm(address=address, progress=progress)
        return write_report(self, console=console)

    def decide(self, *, max_seeds: int | None = None, hours: float | None = None, address: str | None = None,
               console: Any = None, progress: bool = True, stricter: bool = False) -> Path:
        """Add seeds under a sequential plan until the verdict is decided (``study decide``), then report."""
        from study.deciding import add_seeds_until_decided

        add_seeds_until_decided(self, max_seeds=max_seeds, hours=hours, address=address, console=console,
                                progress=progress, stricter=stricter)
        return self.report(console=console, address=address, progress=progress)

    # ----- reading the results as pandas frames (no Ray, no MLflow) ---------------------------------------
    def trials(self) -> pd.DataFrame:
        """One row per search trial: its parameters (None where a conditional one was not sampled), ``status``
        (completed, stopped by ASHA, errored, running), ``epochs`` trained, ``best_epoch`` and the metrics of
        that epoch (a trial's score is its best epoch by the spec's metric, everywhere)."""
        from study.results import typed

        return typed(self.tables()[0], self.spec)

    def history(self) -> pd.DataFrame:
        """One row per trial and epoch with every reported metric (``trial_id``, ``inject``, ``epoch``, ...)."""
        from study.results import typed

        return typed(self.tables()[1])

    def leaderboard(self, *, metric: str | None = None, best_per_method: bool = True) -> pd.DataFrame:
        """The trials sorted by ``metric`` (default: the spec's), best per method first; what
        ``study leaderboard`` prints (before its x100 display)."""
        from study.leaderboard import leaderboard
        from study.spec import METRIC_MODES

        metric = metric or self.spec.metric
        mode = self.spec.mode if metric == self.spec.metric else METRIC_MODES.get(metric, "max")
        return leaderboard(self.trials(), metric=metric, mode=mode, best_per_method=best_per_method)

    def confirm_runs(self) -> pd.DataFrame:
        """One row per finished confirm run: ``method, config_rank, seed``, the test metrics (beam search, the
        whole test split), ``epochs, train_seconds, seconds, params``, and the trial config's fields."""
        from study.results import confirm_frame

        return confirm_frame(self.paths, self.spec)

    def per_image(self) -> pd.DataFrame:
        """One row per confirm run and test image: ``method, config_rank, seed, image_id`` and its scores."""
        from study.results import per_image_frame

        return per_image_frame(self.paths)

    def test_scores(self) -> pd.DataFrame:
        """One row per method and configuration rank: ``seeds`` and every test metric's corpus-level score as
        ``<metric>_mean`` and ``<metric>_std`` over seeds (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D: the numbers papers
        print, the table the README quotes)."""
        from study.results import test_scores

        return test_scores(self.confirm_runs())

    def export(self, dest: Path, *, force: bool = False) -> list[Path]:
        """Copy the report, figures, provenance, spec and result tables into ``dest`` (no checkpoints); ``dest``
        outside the study and empty, or (``force``) holding a previous export, which is replaced."""
        from study.results import export

        return export(self, dest, force=force)

    def verdict(self) -> pd.DataFrame:
        """One row per method (index ``method``): its ``role``, ``seeds``, ``images`` and the mean of CIDEr-D and
        ROUGE-L (the metrics whose corpus score is the mean over images; see ``test_scores`` for BLEU and METEOR)
        with ``<metric>_lo``/``_hi`` bounds, at the level the report uses (95%, or the sequential plan's per-look
        level after ``study decide``). ``attrs``: ``verdict`` (the words), ``diff`` and ``ci`` (target - best
        other, and its interval), ``best_other``, ``margin``, ``level``, ``text``."""
        from study.results import verdict_frame

        return verdict_frame(self)

    # ----- other photo collections (`study evaluate`, study/cross_dataset.py) -----------------------------
    def evaluations(self) -> pd.DataFrame:
        """One row per dataset evaluated with ``study evaluate`` and confirm run: ``dataset, run, method,
        config_rank, seed`` and that run's corpus scores on the dataset (same metric names as ``confirm_runs``)."""
        from study.cross_dataset import evaluations_frame

        return evaluations_frame(self.paths)

    def evaluation_per_image(self, dataset: str | None = None) -> pd.DataFrame:
        """As ``per_image``, on the evaluated datasets (all, or ``dataset``), with a ``dataset`` column first."""
        from study.cross_dataset import evaluation_per_image_frame

        return evaluation_per_image_frame(self.paths, dataset)

    def evaluation_verdict(self, dataset: str) -> pd.DataFrame:
        """As ``verdict``, computed on an evaluated dataset's images (``attrs`` also names the ``dataset``)."""
        from study.cross_dataset import verdict_frame

        return verdict_frame(self.paths, self.spec, dataset)

    def pooled_verdict(self) -> pd.DataFrame:
        """The pooled verdict over the test split and every evaluated dataset (``analysis.pooled``): one row per
        set and a last ``pooled`` row; ``attrs``: ``verdict``, ``decides``, ``diff``, ``ci``, ``other``, ``text``."""
        from study.cross_dataset import pooled_frame

        return pooled_frame(self.paths, self.spec, self.per_image())


def _warn_if_edited(original: Path, copy: Path) -> None:
    """Say so when the YAML a study was started from has changed since: the study keeps using its own copy."""
    try:
        edited = original.read_text() != copy.read_text()
    except OSError:
        edited = False  # moved or deleted: nothing to compare, and nothing the study needs
    if edited:
        logging.getLogger(__name__).warning(
            "%s was edited after this study started; the study keeps the spec it ran with, %s "
            "(a study of the edited spec: study run %s --new)", original, copy, original)
