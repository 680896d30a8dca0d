"""What the search does besides training: Tune's trial events mirrored into MLflow (through the study
tracker, where every MLflow call lives), the time budget, and the trials' run names."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ray import tune
from ray.tune.progress_reporter import TrialProgressCallback

from analysis.metric_table import format_metric
from study.records import missing, read_search_time
from study.records.files import atomic_write_json
from study.records.trial_tables import diverged_reason, last_line
from study.spec import REPORTED, StudySpec
from study.tracking import StudyTracker
from study.tuning.trainable import prune_checkpoints

# This driver's tracker and printer of each study folder. Tune pickles its callbacks into the experiment state
# and ``Tuner.restore`` unpickles them; a restored callback attaches to the live tracker of the driver that
# restored it (whose journal counters are current) rather than to the killed driver's copy.
_LIVE: dict[str, tuple[StudyTracker, Callable[[str], None], StudySpec, "SearchProgress"]] = {}


class SearchProgress:
    """The search's one progress display: trials ended of the study's total (and Tune's ETA for the rest), the
    time budget left, and each method's best score so far; the per-epoch lines print above it."""

    def __init__(self, spec: StudySpec, total: int, ended: int, budget: Path | None, enabled: bool):
        from study.progress import progress_bar

        self.spec, self.budget = spec, budget
        self.best: dict[str, float] = {}
        # Not at a terminal (a log file, CI, nohup): one line per ended trial, with the best so far and an ETA.
        self.bar = progress_bar(total, f"search {spec.name}", unit="trial", initial=ended, enabled=enabled,
                                dynamic_ncols=True, bar_format="{desc}: {n}/{total} trials |{bar}| "
                                "{elapsed}<{remaining}{postfix}")

    def write(self, line: str) -> None:
        if not self.bar.disable:
            self.bar.write(line, file=sys.stderr)  # above the bar, on the stream the bar draws on

    def result(self, method: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not missing(value):
            old = self.best.get(method)
            if old is None or (value > old if self.spec.mode == "max" else value < old):
                self.best[method] = float(value)
        self._postfix()

    def trial_ended(self) -> None:
        self._postfix()
        self.bar.update(1)

    def _postfix(self) -> None:
        parts = [f"{m} {format_metric(self.spec.metric, v)}" for m, v in self.best.items()]
        if self.budget is not None and self.spec.search.time_budget_h:
            left = self.spec.search.time_budget_h * 3600 - read_search_time(self.budget).used_s
            parts.insert(0, f"budget left {max(left, 0) / 60:.0f} min")
        self.bar.set_postfix_str(f"best {self.spec.metric}: " + ", ".join(parts) if self.best else
                                 ", ".join(parts), refresh=True)

    def close(self) -> None:
        self.bar.close()


class SilentTrialProgress(TrialProgressCallback):
    """Tune's own per-trial lines, silenced: without a callback of this kind Tune adds one that prints "Trial ...
    completed. Last result: ..." on stdout, also for a trial that ended errored (a divergence ends the trainable
    normally), while ``TrackingCallback`` says what happened, errors with their reason (issue 33, item 22)."""

    def _print(self, msg: str) -> None:
        pass


class TrackingCallback(tune.Callback):
    """Forwards Tune's trial events to the study tracker (all MLflow work happens in study.tracking) and to the
    search's progress display."""

    def __init__(self, tracker: StudyTracker, spec: StudySpec, echo: Callable[[str], None] | None = None,
                 progress: SearchProgress | None = None):
        self.spec = spec
        self.folder = str(tracker.study_dir)
        self.last_epoch: dict[str, int] = {}
        # One concise line per event, instead of Tune's tables: above the progress bar when there is one.
        if progress is not None and not progress.bar.disable:
            echo = progress.write
        _LIVE[self.folder] = (tracker, echo or (lambda line: None), spec, progress)

    @property
    def tracker(self) -> StudyTracker:
        return _LIVE[self.folder][0]

    @property
    def echo(self) -> Callable[[str], None]:
        return _LIVE[self.folder][1]

    @property
    def progress(self) -> "SearchProgress | None":
        return _LIVE[self.folder][3]

    def __getstate__(self) -> dict[str, Any]:
        # What Tune pickles: the tracker and the printer stay with the driver (see _LIVE).
        return {"spec": self.spec, "folder": self.folder, "last_epoch": self.last_epoch}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.folder not in _LIVE and len(_LIVE) == 1:
            # The study folder was moved or copied since Tune pickled this callback: the driver restoring it has
            # the one live tracker (of the folder where the study is now), and its spec names the paths there.
            self.folder = next(iter(_LIVE))
            self.spec = _LIVE[self.folder][2]
        if self.folder not in _LIVE:
            raise RuntimeError(f"a restored Tune callback of study {self.folder} found no tracker: run_study "
                               "builds its TrackingCallback before Tuner.restore")

    def _name(self, trial) -> str:
        return trial_name(self.spec, trial)

    def on_trial_start(self, iteration, trials, trial, **info):
        params = self.spec.trial_config(trial.config).model_dump(mode="json", by_alias=True, exclude={"dataset"})
        self.tracker.trial_started(trial.trial_id, self._name(trial), active_params(self.spec, trial.config, params),
                                   arm=self.spec.arm_of(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        self.last_epoch[trial.trial_id] = epoch
        if not self.tracker.trial_result(trial.trial_id, {k: result[k] for k in REPORTED if k in result}, step=epoch):
            return  # a resumed trial's restored epoch, logged before the driver died
        metric = result.get(self.spec.metric)
        if self.progress is not None:
            self.progress.result(str(self.spec.arm_of(trial.config) or self.spec.fixed.get("inject", "all")), metric)
        self.echo(f"{self._name(trial)}  epoch {epoch}/{self.spec.trial_config(trial.config).epochs}  "
                  f"{self.spec.metric} {format_metric(self.spec.metric, metric)}  "
                  f"val_loss {result.get('val_loss', 0):.3f}  "
                  f"({result.get('epoch_seconds', 0):.1f} s)")

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.progress is not None:
            self.progress.trial_ended()
        diverged = diverged_reason(trial.storage.storage_filesystem, trial.storage.trial_fs_path)
        if diverged:  # ended by its divergence (see trial_function): errored, with its reason, never retried
            self.tracker.trial_finished(trial.trial_id, "errored", diverged, best=(self.spec.metric, self.spec.mode))
            self.echo(f"{self._name(trial)}  ERRORED: {diverged}")
            prune_checkpoints(trial)
            return
        # ASHA's stop at max_t can reach us before the final result's callback: read the trial's own record.
        last = int((trial.last_result or {}).get("epoch", 0))
        epochs = max(last, self.last_epoch.get(trial.trial_id, 0))
        status = "completed" if epochs >= self.spec.trial_config(trial.config).epochs else "stopped"
        by = "ASHA or its arm's search budget" if self.spec.search.epochs_per_arm else "ASHA"
        reason = None if status == "completed" else f"stopped by {by} after {epochs} epochs"
        self.tracker.trial_finished(trial.trial_id, status, reason, best=(self.spec.metric, self.spec.mode))
        self.echo(f"{self._name(trial)}  {reason or 'completed'}")
        prune_checkpoints(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.progress is not None:
            self.progress.trial_ended()
        reason = error_reason(trial)
        self.tracker.trial_finished(trial.trial_id, "errored", reason, best=(self.spec.metric, self.spec.mode))
        prune_checkpoints(trial)
        self.echo(f"{self._name(trial)}  ERRORED: {reason}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.echo(f"{self._name(trial)}  failed; retrying from its last checkpoint")

    def on_step_end(self, iteration, trials, **info):
        self.tracker.flush()  # retry a server that was down, at most every RETRY_SECONDS


def active_params(spec: StudySpec, sampled: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """``params`` without the conditional parameters of ``spec.space`` whose ``when:`` does not hold for the
    ``sampled`` values (``attention_dim`` of a non-attention trial): their config default was never searched."""
    inactive = {name for name, param in spec.space.items() if name not in sampled or not param.matches(sampled)}
    return {k: v for k, v in params.items() if k not in inactive}


def error_reason(trial) -> str:
    """The last line of a failed trial's traceback (e.g. ``TrialDiverged: training loss became nan ...``),
    from the driver's text copy of the error file (Tune's other copy, ``error.pkl``, is a pickle)."""
    text = ""
    if trial.error_file and os.path.exists(trial.error_file):
        text = Path(trial.error_file).read_text(errors="replace")
    return last_line(text)


def spec_run_name(spec: StudySpec, sampled: dict[str, Any]) -> str:
    return spec.run_name(sampled)


def trial_name(spec: StudySpec, trial) -> str:
    """A trial's run name and folder name, e.g. ``init-lstm-2x512-word-3f2a1b7c`` (ends in the trial id)."""
    return f"{spec_run_name(spec, trial.config)}-{trial.trial_id}"


class SearchTimeBudget(tune.Stopper):
    """Ends the search once it has run ``budget_s`` seconds of wall time, summed over every driver of the study.

    The seconds used are kept in ``ledger`` (``search_time.json`` in the study folder), so a resumed study gets
    what is left; Tune's own ``time_budget_s`` starts again in full on ``Tuner.restore``. Trials running when
    the budget is spent are stopped by Tune and ranked on the epochs they finished."""

    WRITE_EVERY_S = 10.0

    def __init__(self, budget_s: float, ledger: Path):
        self.budget_s = budget_s
        self.ledger = Path(ledger)
        self._clock: float | None = None  # this driver's start, set at the first check (after Ray and data)

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        now = time.monotonic()
        if self._clock is None:
            self._clock, self._before, self._written = now, read_search_time(self.ledger).used_s, 0.0
        # Parenthesised: (before + now) - clock rounds at the scale of the monotonic clock, so a ledger already
        # at the budget could read 99.99999999 of 100 s and never stop.
        used = self._before + (now - self._clock)
        spent = used >= self.budget_s
        if spent or now - self._written >= self.WRITE_EVERY_S:
            atomic_write_json(self.ledger, {"budget_s": self.budget_s, "used_s": round(used, 1), "spent": spent})
            self._written = now
        return spent

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its RunConfig; a restored stopper must start its own clock and re-read the ledger.
        return {"budget_s": self.budget_s, "ledger": self.ledger, "_clock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if str(self.ledger.parent) not in _LIVE and len(_LIVE) == 1:
            # The study folder was moved or copied since Tune pickled this stopper: keep the ledger of the folder
            # the study is in now, never the original's (issue 33, item 1).
            self.ledger = Path(next(iter(_LIVE))) / self.ledger.name


