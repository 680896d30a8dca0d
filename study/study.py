"""A study, the top of the package: the ``study`` command and the Python API (``study.load(name)``) call this.

    search()   Ray Tune + Optuna + ASHA over the spec's space        -> Tune's trial folders  (study.tuning)
    confirm()  the best configurations retrained with several seeds  -> confirm/*.json       (study.stages.confirm)
    report()   verdict with intervals, figures, MLflow evidence      -> report/, verdict.csv (study.stages.report)
    decide()   more seeds under a sequential plan, then report()     -> decide.json          (study.stages.decide)
    evaluate() the confirm models scored on another dataset           -> evaluate/NAME/       (study.stages.evaluate)

Each stage is a function of the study's context (``study.context.StudyContext``: spec, folder, tracker, data,
trial tables) and reads what the one before wrote, from the study folder, so each can run (and resume) on its
own. The readers (``trials()``, ``leaderboard()``, ``confirm_runs()``, ``verdict()``, ...) are
``study.records.frames``' and return pandas frames: no Ray, no MLflow, no GPU; their scores (and differences of
scores) in points, x100 of pycocoevalcap's 0..1 scale, as the console, the report, MLflow and the exports show them
(``analysis.metric_table.in_points``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pandas as pd

from analysis.metric_table import in_points
from study.context import StudyContext, StudyNotFound
from study.records import frames
from study.stages import export as exporting

if TYPE_CHECKING:
    from study.stages.evaluate import EvaluateOutcome
    from study.tuning import StudyOutcome


def load(study: str | Path, storage: str | Path | None = None) -> "Study":
    """Open a study by name (under ``storage``, default ``./runs``) or by its folder (its dataset is not
    checked: reading results needs no images)."""
    return Study.open(study, storage, check_paths=False)


class Study(StudyContext):
    """A study's context with its stages and its readers."""

    # ----- the stages ----------------------------------------------------------------------------------
    def search(self, *, resume: bool = False, address: str | None = None, max_concurrent: int | None = None,
               echo: Callable[[str], None] | None = None, progress: bool = True, verbose: int = 0) -> "StudyOutcome":
        """Run (or continue) the search; Ray is shut down after it."""
        from study import tuning

        self.pin_precision()
        try:
            return tuning.run_study(self, address=address, max_concurrent=max_concurrent, resume=resume, echo=echo,
                                    progress=progress, verbose=verbose)
        finally:
            tuning.shutdown()

    def confirm(self, *, address: str | None = None, progress: bool = True,
                runs: list[tuple[str, int, int, Any]] | None = None) -> Path:
        """Retrain the best configurations with seeds and score the test split (resumable: finished runs are
        kept). ``runs`` (method, rank, seed, config) defaults to the spec's confirm stage."""
        from study.stages.confirm import confirm_stage

        return confirm_stage(self, functools.partial(_ray_session, address), progress=progress, runs=runs)

    def report(self, *, console: Any = None, address: str | None = None, progress: bool = True) -> Path:
        """The confirm stage if needed, then the verdict, the report and its evidence in MLflow."""
        from study.stages.report import write_report

        self.confirm(address=address, progress=progress)
        return write_report(self, console=console)

    def decide(self, *, max_seeds: int | None = None, hours: float | None = None, address: str | None = None,
               console: Any = None, progress: bool = True, stricter: bool = False) -> Path:
        """Add seeds under a sequential plan until the verdict is decided (``study decide``), then report."""
        from study.stages.decide import add_seeds_until_decided

        add_seeds_until_decided(self, lambda runs: self.confirm(address=address, progress=progress, runs=runs),
                                max_seeds=max_seeds, hours=hours, console=console, stricter=stricter)
        return self.report(console=console, address=address, progress=progress)

    def evaluate(self, dataset_json: str | Path, *, images_root: str | Path | None = None, split: str = "test",
                 name: str | None = None, device: str | None = None, report: bool = True) -> "EvaluateOutcome":
        """Caption and score another dataset's ``split`` with every confirm run's model and compute the verdict on
        it (``study evaluate``; resumable: finished runs are reused). With ``report``, the report is rewritten
        when this set's results are newer than it; ``outcome.report`` is its path then, else None."""
        from study.stages.evaluate import run_evaluate
        from study.stages.report import write_report

        outcome = run_evaluate(self, Path(dataset_json), images_root=None if images_root is None else
                               Path(images_root), split=split, name=name, device=device)
        written = self.paths.report / "report.md"
        newest = max((p.stat().st_mtime for p in (outcome.folder / "runs").glob("*.json")), default=0.0)
        if report and (not written.is_file() or written.stat().st_mtime < newest):
            outcome.report = write_report(self)
        return outcome

    # ----- reading the results as pandas frames (no Ray, no MLflow) ---------------------------------------
    def trials(self) -> pd.DataFrame:
        """One row per search trial: its parameters (None where a conditional one was not sampled), ``status``
        (completed, stopped by ASHA, errored, running), ``epochs`` trained, ``best_epoch`` and the metrics of
        that epoch (a trial's score is its best epoch by the spec's metric, everywhere)."""
        return in_points(frames.trials_frame(self))

    def history(self) -> pd.DataFrame:
        """One row per trial and epoch with every reported metric (``trial_id``, ``inject``, ``epoch``, ...)."""
        return in_points(frames.history_frame(self))

    def leaderboard(self, *, metric: str | None = None, best_per_method: bool = True) -> pd.DataFrame:
        """The trials sorted by ``metric`` (default: the spec's), best per method first; what
        ``study leaderboard`` prints."""
        return in_points(frames.leaderboard_frame(self, metric=metric, best_per_method=best_per_method))

    def confirm_runs(self) -> pd.DataFrame:
        """One row per finished confirm run: ``method, config_rank, seed``, the test metrics (beam search, the
        whole test split), ``epochs, train_seconds, seconds, params``, and the trial config's fields."""
        return in_points(frames.confirm_frame(self.paths, self.spec))

    def confirm_history(self) -> pd.DataFrame:
        """One row per confirm run and epoch: ``run, method, config_rank, seed, epoch`` and what the epoch reported
        (validation scores and loss, learning rate, seconds): the confirm runs' learning curves."""
        from study.records.run_results import confirm_history

        return in_points(confirm_history(self.paths))

    def per_image(self) -> pd.DataFrame:
        """One row per confirm run and test image: ``method, config_rank, seed, image_id`` and its scores."""
        return in_points(frames.per_image_frame(self.paths))

    def test_scores(self) -> pd.DataFrame:
        """One row per method and configuration rank: ``seeds`` and every test metric's corpus-level score as
        ``<metric>_mean`` and ``<metric>_std`` over seeds (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D: the numbers papers
        print, the table docs/answer.md quotes)."""
        return in_points(frames.test_scores(frames.confirm_frame(self.paths, self.spec), self.spec.methods))

    def verdict(self) -> pd.DataFrame:
        """One row per method (index ``method``): its ``role``, ``seeds``, ``images`` and the mean of CIDEr-D and
        ROUGE-L (the metrics whose corpus score is the mean over images; see ``test_scores`` for BLEU and METEOR)
        with ``<metric>_lo``/``_hi`` bounds, at the level the report uses (95%, or the sequential plan's per-look
        level after ``study decide``). ``attrs``: ``verdict`` (the words), ``diff`` and ``ci`` (target - best
        other, and its interval), ``best_other``, ``margin``, ``level``, ``text``."""
        return in_points(frames.verdict_frame(self))

    def export(self, dest: Path, *, force: bool = False) -> list[Path]:
        """Copy the report, figures, provenance, spec and result tables into ``dest`` (no checkpoints); ``dest``
        outside the study and empty, or (``force``) holding a previous export, which is replaced."""
        return exporting.export(self, dest, force=force)

    # ----- other photo collections (`study evaluate`, study/records/verdicts.py) -----------------------------
    def evaluations(self) -> pd.DataFrame:
        """One row per dataset evaluated with ``study evaluate`` and confirm run: ``dataset, run, method,
        config_rank, seed`` and that run's corpus scores on the dataset (same metric names as ``confirm_runs``)."""
        from study.records.verdicts import evaluations_frame

        return in_points(evaluations_frame(self.paths))

    def evaluation_per_image(self, dataset: str | None = None) -> pd.DataFrame:
        """As ``per_image``, on the evaluated datasets (all, or ``dataset``), with a ``dataset`` column first."""
        from study.records.verdicts import evaluation_per_image_frame

        return in_points(evaluation_per_image_frame(self.paths, dataset))

    def evaluation_verdict(self, dataset: str) -> pd.DataFrame:
        """As ``verdict``, computed on an evaluated dataset's images (``attrs`` also names the ``dataset``)."""
        from study.records.verdicts import verdict_frame

        return in_points(verdict_frame(self.paths, self.spec, dataset))

    def pooled_verdict(self) -> pd.DataFrame:
        """The pooled verdict over the test split and every evaluated dataset (``analysis.pooled``): one row per
        set and a last ``pooled`` row; ``attrs``: ``verdict``, ``decides``, ``diff``, ``ci``, ``other``, ``text``."""
        from study.records.verdicts import pooled_frame

        return in_points(pooled_frame(self.paths, self.spec, frames.per_image_frame(self.paths)))


__all__ = ["Study", "StudyNotFound", "load"]


def _ray_session(address: str | None):
    """The Ray a stage trains on (the search's: a local one unless ``address``), imported only when it is entered."""
    from study import tuning

    return tuning.ray_session(address)
