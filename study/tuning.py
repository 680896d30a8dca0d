"""Every Ray Tune import of the project lives here (Ray's API has moved three times; keep it in one place).

``run_study`` prepares the data once in the driver, puts it into Ray's object store through
``tune.with_parameters`` (so concurrent trials on a node share one copy), and runs a ``Tuner`` with Optuna
(one searcher per injection method when stratified), ASHA, actor reuse, retries from the last checkpoint,
and a callback that mirrors every trial into MLflow through :mod:`study.tracking`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from study.config import TrialConfig
from study.data.prepare import PreparedData, TokenSetting, prepare
from study.registry import any_needs_grid
from study.spec import REPORTED, StudySpec, storage_is_remote
from study.tracking import StudyTracker, git_commit, sqlite_uri

log = logging.getLogger(__name__)

# One checkpoint per epoch with num_to_keep=1 snapshots the experiment often; that is intended here.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")



# ----- where a study lives -----------------------------------------------------------------------------
def study_dir(spec: StudySpec) -> Path:
    """Local folder for the study's bookkeeping (journal, run ids, study.json).

    Tune's own results go to ``spec.storage`` (which may be s3://); the bookkeeping stays on the driver.
    """
    if storage_is_remote(spec.storage):
        return Path.cwd() / "runs" / spec.name
    return Path(spec.storage) / spec.name


def tracking_uri(spec: StudySpec) -> str:
    return spec.tracking.uri or sqlite_uri(study_dir(spec) / "mlflow.db")


def write_study_file(spec: StudySpec, spec_path: Path) -> Path:
    """``study.json`` lets ``study resume/leaderboard/report NAME`` find the spec, storage and MLflow store."""
    folder = study_dir(spec)
    folder.mkdir(parents=True, exist_ok=True)
    info = {"name": spec.name, "spec": str(Path(spec_path).resolve()), "storage": spec.storage,
            "tracking_uri": tracking_uri(spec), "experiment": spec.tracking.experiment or spec.name}
    path = folder / "study.json"
    path.write_text(json.dumps(info, indent=2))
    return path


# ----- search space -> Optuna define-by-run ------------------------------------------------------------
def _suggest(trial, name: str, param) -> Any:
    kind = param.kind
    if kind == "choice":
        return trial.suggest_categorical(name, list(param.choice))
    if kind == "uniform":
        return trial.suggest_float(name, *param.uniform)
    if kind == "loguniform":
        return trial.suggest_float(name, *param.loguniform, log=True)
    if kind == "int":
        return trial.suggest_int(name, *param.int_)
    low, high, step = param.quniform
    if all(float(v).is_integer() for v in (low, high, step)):
        return trial.suggest_int(name, int(low), int(high), step=int(step))
    return trial.suggest_float(name, low, high, step=step)


class DefineByRun:
    """An Optuna define-by-run space: conditional parameters are sampled only where ``when`` holds.

    A class rather than a closure so the searcher's state pickles (Tune saves it for ``study resume``).
    """

    def __init__(self, spec: StudySpec, fixed: dict[str, Any]):
        self.spec = spec
        self.fixed = dict(fixed)

    def __call__(self, trial) -> dict[str, Any]:
        sampled = dict(self.fixed)
        for name, param in self.spec.space.items():
            if name not in self.fixed and param.matches({**self.spec.fixed, **sampled}):
                sampled[name] = _suggest(trial, name, param)
        return dict(self.fixed)  # constants Optuna adds to the config (e.g. this searcher's method)


def _sampler(spec: StudySpec, seed: int, fixed: dict[str, Any]):
    import optuna

    if spec.search.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.search.algorithm == "grid":
        grid = {n: list(p.choice) for n, p in spec.space.items() if n not in fixed}
        return optuna.samplers.GridSampler(grid, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(5, spec.trials_per_method // 2)))


def _optuna_searcher(spec: StudySpec, fixed: dict[str, Any], seed: int) -> OptunaSearch:
    return OptunaSearch(space=DefineByRun(spec, fixed), metric=spec.metric, mode=spec.mode,
                        sampler=_sampler(spec, seed, fixed))


class StratifiedSearcher(Searcher):
    """One searcher per injection method and the same number of trials each, so no method wins by getting
    more tuning. Suggestions go round-robin to the method with the fewest trials so far."""

    def __init__(self, searchers: dict[str, Searcher], per_method: int, metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.searchers = searchers
        self.per_method = per_method
        self.counts = {m: 0 for m in searchers}
        self.owner: dict[str, str] = {}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return all(s.set_search_properties(metric, mode, config, **spec) for s in self.searchers.values())

    def suggest(self, trial_id: str):
        open_methods = [m for m in self.searchers if self.counts[m] < self.per_method]
        if not open_methods:
            return Searcher.FINISHED
        method = min(open_methods, key=lambda m: self.counts[m])
        config = self.searchers[method].suggest(trial_id)
        if config is None or config == Searcher.FINISHED:
            return config
        self.counts[method] += 1
        self.owner[trial_id] = method
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.owner:
            self.searchers[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.owner:
            self.searchers[self.owner[trial_id]].on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.__dict__, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.__dict__.update(pickle.load(fh))


def build_searcher(spec: StudySpec) -> Searcher:
    if spec.stratify == "inject":
        searchers = {m: _optuna_searcher(spec, {"inject": m}, spec.search.seed + i)
                     for i, m in enumerate(spec.methods)}
        return StratifiedSearcher(searchers, spec.trials_per_method, spec.metric, spec.mode)
    return _optuna_searcher(spec, {}, spec.search.seed)


def total_trials(spec: StudySpec) -> int:
    return spec.trials_per_method * len(spec.methods) if spec.stratify == "inject" else spec.search.trials


def build_scheduler(spec: StudySpec):
    if not spec.asha.enabled:
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", metric=spec.metric, mode=spec.mode,
                         max_t=spec.asha.max_epochs, grace_period=spec.asha.grace_period,
                         reduction_factor=spec.asha.reduction_factor)


# ----- the trainable -----------------------------------------------------------------------------------
def token_settings(spec: StudySpec) -> list[TokenSetting]:
    """Every tokenisation a trial of this spec may ask for (prepared once in the driver)."""
    def values(name: str) -> list[Any]:
        if name in spec.space and spec.space[name].choice is not None:
            return list(spec.space[name].choice)
        if name in spec.space:
            raise ValueError(f"space.{name} must be a choice: captions are tokenised once per value")
        return [spec.fixed.get(name, TrialConfig.model_fields[name].default)]

    settings = []
    for tokens in values("tokens"):
        for max_len in values("max_len"):
            for min_count in values("min_count"):
                cfg = TrialConfig.model_validate({"tokens": tokens, "max_len": max_len, "min_count": min_count})
                settings.append(TokenSetting.of(cfg))
    return list(dict.fromkeys(settings))


def needs_grid(spec: StudySpec) -> bool:
    return any_needs_grid([*spec.methods, spec.fixed.get("inject")])  # the registry says which methods read the grid


def trial_function(config: dict[str, Any], spec: StudySpec, data: PreparedData) -> None:
    """The Tune trainable: sampled config -> the shared training loop, reporting each epoch."""
    import pyarrow.fs as pafs
    import torch

    from study.training import TrialDiverged, run_trial

    torch.set_num_threads(max(1, int(spec.resources.cpu)))  # follow the trial's CPU share
    cfg = spec.trial_config(config)
    # Tune retries any failed trial max_failures times. A diverged one would only diverge again (resume is
    # exact), so its first divergence leaves a note in the trial's storage folder and the retries end at once.
    storage = tune.get_context().get_storage()
    diverged_note = f"{storage.trial_fs_path}/diverged.txt"
    fs = storage.storage_filesystem
    if fs.get_file_info(diverged_note).type == pafs.FileType.File:
        with fs.open_input_stream(diverged_note) as note:
            raise TrialDiverged(f"{note.read().decode()} (not retried: resuming would diverge again)")
    checkpoint = restore_source(tune.get_checkpoint(), fs, storage.trial_fs_path)
    with tempfile.TemporaryDirectory(prefix="trial-") as tmp:
        resume_from = None
        if checkpoint is not None:
            resume_from = Path(checkpoint.to_directory(os.path.join(tmp, "restored")))
        reported = []

        def report(metrics: dict[str, Any], checkpoint_dir: Path) -> None:
            reported.append(metrics["epoch"])
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

        try:
            result = run_trial(cfg, data, work_dir=Path(tmp), report=report, resume_from=resume_from,
                               progress=False)
        except TrialDiverged as diverged:
            fs.create_dir(storage.trial_fs_path, recursive=True)
            with fs.open_output_stream(diverged_note) as note:
                note.write(str(diverged).encode())
            raise
        if not reported and resume_from is not None and result["epochs"]:
            # Resumed from a checkpoint of its last epoch (see restore_source): tell Tune the final result again.
            tune.report(result["epochs"][-1], checkpoint=tune.Checkpoint.from_directory(str(resume_from)))


def restore_source(checkpoint, fs, trial_fs_path: str):
    """The checkpoint a retried or resumed trial continues from: Tune's, unless it is gone.

    A finished trial is pruned to its last checkpoint at once (see ``prune_checkpoints``). If the driver dies
    before Tune's next experiment snapshot, the restored snapshot still shows the trial running and names a
    checkpoint that was pruned; the trial's newest remaining checkpoint is then the one to continue from."""
    import pyarrow.fs as pafs

    if checkpoint is None or checkpoint.filesystem.get_file_info(checkpoint.path).type != pafs.FileType.NotFound:
        return checkpoint
    left = checkpoint_folders(fs, trial_fs_path)
    log.warning("checkpoint %s is gone; continuing from %s", checkpoint.path, left[-1] if left else "scratch")
    return tune.Checkpoint(left[-1], filesystem=fs) if left else None


# ----- MLflow bridge -----------------------------------------------------------------------------------
class TrackingCallback(tune.Callback):
    """Forwards Tune's trial events to the study tracker (all MLflow work happens in study.tracking)."""

    def __init__(self, tracker: StudyTracker, spec: StudySpec, echo: Callable[[str], None] | None = None):
        self.tracker = tracker
        self.spec = spec
        self.echo = echo or (lambda line: None)  # one concise line per event, instead of Tune's tables
        self.last_epoch: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment state; the printer (a console) does not pickle.
        return {**self.__dict__, "echo": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.echo = self.echo or (lambda line: None)

    def _name(self, trial) -> str:
        return trial_name(self.spec, trial)

    def on_trial_start(self, iteration, trials, trial, **info):
        params = self.spec.trial_config(trial.config).model_dump(mode="json", by_alias=True, exclude={"dataset"})
        self.tracker.trial_started(trial.trial_id, self._name(trial), params)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        self.last_epoch[trial.trial_id] = epoch
        self.tracker.trial_result(trial.trial_id, {k: result[k] for k in REPORTED if k in result}, step=epoch)
        metric = result.get(self.spec.metric)
        self.echo(f"{self._name(trial)}  epoch {epoch}/{self.spec.asha.max_epochs}  "
                  f"{self.spec.metric} {_fmt(self.spec.metric, metric)}  val_loss {result.get('val_loss', 0):.3f}  "
                  f"({result.get('epoch_seconds', 0):.1f} s)")

    def on_trial_complete(self, iteration, trials, trial, **info):
        # ASHA's stop at max_t can reach us before the final result's callback: read the trial's own record.
        last = int((trial.last_result or {}).get("epoch", 0))
        epochs = max(last, self.last_epoch.get(trial.trial_id, 0))
        status = "completed" if epochs >= self.spec.asha.max_epochs else "stopped"
        reason = None if status == "completed" else f"stopped by ASHA after {epochs} epochs"
        self.tracker.trial_finished(trial.trial_id, status, reason)
        self.echo(f"{self._name(trial)}  {reason or 'completed'}")
        prune_checkpoints(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        reason = error_reason(trial)
        self.tracker.trial_finished(trial.trial_id, "errored", reason)
        prune_checkpoints(trial)
        self.echo(f"{self._name(trial)}  ERRORED: {reason}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.echo(f"{self._name(trial)}  failed; retrying from its last checkpoint")

    def on_step_end(self, iteration, trials, **info):
        self.tracker.flush()  # retry a server that was down, at most every RETRY_SECONDS


def remove_lost_trial_folders(spec: StudySpec, known: set[str]) -> None:
    """Delete the folders (and checkpoints) of trials Tune lost with its last snapshot before a crash;
    they are never resumed (the searcher proposes them again under new ids)."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(experiment_path(spec))
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type != pafs.FileType.Directory or info.base_name.rsplit("-", 1)[-1] in known:
            continue  # folder names end in the trial id: see trial_name
        # A trial's folder: Tune's params.json, or only checkpoints (the trial writes those itself, and a
        # driver killed early may not have synced params.json yet).
        if checkpoint_folders(fs, info.path) \
                or fs.get_file_info(f"{info.path}/params.json").type == pafs.FileType.File:
            fs.delete_dir(info.path)


def checkpoint_folders(fs, trial_fs_path: str) -> list[str]:
    """Paths of a trial folder's ``checkpoint_NNNNNN`` folders, oldest first (local folder or s3://)."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(trial_fs_path, allow_not_found=True))
    return sorted(i.path for i in infos
                  if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))


def prune_checkpoints(trial) -> None:
    """Delete all but the newest checkpoint of a finished trial (local folder or s3://, via Tune's fs)."""
    fs = trial.storage.storage_filesystem
    for path in checkpoint_folders(fs, trial.storage.trial_fs_path)[:-1]:
        fs.delete_dir(path)


def error_reason(trial) -> str:
    """The last line of a failed trial's traceback (e.g. ``TrialDiverged: training loss became nan ...``).

    The driver's local copy of the error file exists when callbacks run; the copy in storage (what
    ``trial.get_error()`` reads) may not have been synced yet."""
    text = ""
    if trial.error_file and os.path.exists(trial.error_file):
        text = Path(trial.error_file).read_text(errors="replace")
    if not text.strip():
        error = trial.get_error()
        text = str(error) if error else ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:2000] if lines else "unknown error"


def _fmt(metric: str, value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{100 * value:.1f}" if ("CIDEr" in metric or "BLEU" in metric) else f"{value:.4g}"


def spec_run_name(spec: StudySpec, sampled: dict[str, Any]) -> str:
    return spec.trial_config(sampled).run_name


def trial_name(spec: StudySpec, trial) -> str:
    """A trial's run name and folder name, e.g. ``init-lstm-2x512-word-3f2a1b7c`` (ends in the trial id)."""
    return f"{spec_run_name(spec, trial.config)}-{trial.trial_id}"


# ----- running and resuming ----------------------------------------------------------------------------
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
            self._clock, self._before, self._written = now, read_search_time(self.ledger)["used_s"], 0.0
        used = self._before + now - self._clock
        spent = used >= self.budget_s
        if spent or now - self._written >= self.WRITE_EVERY_S:
            atomic_write_json(self.ledger, {"budget_s": self.budget_s, "used_s": round(used, 1), "spent": spent})
            self._written = now
        return spent

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its RunConfig; a restored stopper must start its own clock and re-read the ledger.
        return {"budget_s": self.budget_s, "ledger": self.ledger, "_clock": None}


def read_search_time(ledger: Path) -> dict[str, Any]:
    """``{"budget_s", "used_s", "spent"}`` of a study's time budget (zeros before the search starts)."""
    if not Path(ledger).is_file():
        return {"budget_s": None, "used_s": 0.0, "spent": False}
    return json.loads(Path(ledger).read_text())


def atomic_write_json(path: Path, value: Any) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


@dataclass
class StudyOutcome:
    name: str
    study_dir: Path
    tracking_uri: str
    experiment: str
    trials: Any  # pandas DataFrame, one row per trial
    interrupted: bool
    seconds: float


def drop_duplicate_actor_failures() -> None:
    """Work around a race in Ray 2.60's Tune that loses a trial when a node dies (seen in the 2-node kill test).

    A trial handed a cached actor waits PENDING for its ``reset`` call. When that actor's node dies, Tune
    reports the one failure twice: its actor-died handler requeues the trial (counting one retry), then the
    ``reset`` future's error arrives for the requeued trial and marks it ERROR for good, whatever
    ``max_failures`` says. The trial also stays in the controller's "resetting" set, so it could never be given
    an actor again. This drops the second report and clears that flag. Ray is pinned (pyproject.toml) because
    this touches the controller's private state; the test of a killed node proves it still works.
    """
    from ray.exceptions import RayActorError
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

    original = TuneController._process_trial_failure
    if getattr(original, "drops_duplicate_actor_failures", False):
        return

    def process_trial_failure(self, trial, exception):
        if isinstance(exception, RayActorError):
            self._resetting_trials.discard(trial)
            if trial.status == Trial.PENDING and trial not in self._trial_to_actor:
                log.info("trial %s: its dead actor was reported twice; it is already queued to retry", trial)
                return
        original(self, trial, exception)

    process_trial_failure.drops_duplicate_actor_failures = True
    TuneController._process_trial_failure = process_trial_failure


def ensure_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    ray.init(address=address, log_to_driver=False, include_dashboard=False if address is None else None,
             runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}})


def trial_slots(spec: StudySpec) -> int:
    """Trials the cluster can run at once now. Tune lets a custom searcher have only one pending trial
    unless told a concurrency, which serialises short trials; on an autoscaling cluster set
    ``search.max_concurrent`` to the size it grows to."""
    resources = ray.cluster_resources()
    slots = resources.get("CPU", 1) / spec.resources.cpu
    if spec.resources.gpu:
        slots = min(slots, resources.get("GPU", 0) / spec.resources.gpu)
    return max(1, int(slots))


def describe_budget(spec: StudySpec) -> str:
    """The dry-run text: the space and the trial budget."""
    lines = [f"study {spec.name}: {total_trials(spec)} trials, search={spec.search.algorithm}, "
             f"metric={spec.metric} ({spec.mode})"]
    if spec.stratify:
        lines.append(f"  stratified by inject: {spec.trials_per_method} trials each for {', '.join(spec.methods)}")
    if spec.search.time_budget_h:
        lines.append(f"  time budget: {spec.search.time_budget_h:g} h of wall time for the search (summed over resumes)")
    lines.append(f"  ASHA: {'on' if spec.asha.enabled else 'off'}, max {spec.asha.max_epochs} epochs, "
                 f"grace {spec.asha.grace_period}, reduction {spec.asha.reduction_factor}")
    lines.append(f"  epochs at most: {total_trials(spec) * spec.asha.max_epochs}; resources per trial: "
                 f"{spec.resources.cpu:g} CPU, {spec.resources.gpu:g} GPU")
    lines.append("  fixed: " + (", ".join(f"{k}={v}" for k, v in spec.fixed.items()) or "-"))
    for name, desc in spec.space_description().items():
        when = spec.space[name].when
        lines.append(f"  {name}: {desc}" + (f" when {when}" if when else ""))
    lines.append(f"  dataset: {spec.dataset.kind}; storage: {spec.storage}; MLflow: {tracking_uri(spec)}")
    return "\n".join(lines)


def run_study(spec: StudySpec, spec_path: Path, *, address: str | None = None, max_concurrent: int | None = None,
              resume: bool = False, progress: bool = True, verbose: int = 0,
              echo: Callable[[str], None] | None = None) -> StudyOutcome:
    """Run (or, with ``resume``, continue) a study. Returns the trial table."""
    t0 = time.perf_counter()
    folder = study_dir(spec)
    write_study_file(spec, spec_path)
    uri = tracking_uri(spec)
    experiment = spec.tracking.experiment or spec.name
    tracker = StudyTracker(uri, experiment, spec.name, folder)

    data = prepare(spec.dataset, token_settings(spec), need_grid=needs_grid(spec), progress=progress)
    tracker.start_study(
        params={"trials": total_trials(spec), "search": spec.search.algorithm, "metric": spec.metric,
                "stratify": spec.stratify, "asha_max_epochs": spec.asha.max_epochs, **{
                    f"fixed.{k}": v for k, v in spec.fixed.items()}},
        tags={"git_commit": git_commit(), "dataset": str(data.info["dataset"]),
              "dataset_fingerprint": str(data.info["dataset_fingerprint"]),
              "feature_cache": str(data.info["feature_cache"]), "encoder": str(data.info["encoder"])},
        spec_text=Path(spec_path).read_text() if Path(spec_path).is_file() else None)

    ensure_ray(address)
    trainable = tune.with_resources(
        tune.with_parameters(trial_function, spec=spec, data=data),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    callback = TrackingCallback(tracker, spec, echo)

    drop_duplicate_actor_failures()
    ledger = folder / "search_time.json"
    budget = SearchTimeBudget(spec.search.time_budget_h * 3600, ledger) if spec.search.time_budget_h else None
    interrupted = False
    if resume and tune.Tuner.can_restore(experiment_path(spec)):
        tuner = tune.Tuner.restore(experiment_path(spec), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        known = {trial.trial_id for trial in tune.ExperimentAnalysis(experiment_path(spec)).trials}
        tracker.discard_trials(keep=known)
        remove_lost_trial_folders(spec, known)
    else:
        if resume:
            log.warning("no Tune state at %s yet: starting the study", experiment_path(spec))
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=build_searcher(spec), scheduler=build_scheduler(spec), num_samples=total_trials(spec),
                max_concurrent_trials=max_concurrent or spec.search.max_concurrent or trial_slots(spec),
                reuse_actors=True,
                trial_name_creator=functools.partial(trial_name, spec),
                trial_dirname_creator=functools.partial(trial_name, spec)),
            run_config=tune.RunConfig(
                name="tune", storage_path=f"{spec.storage.rstrip('/')}/{spec.name}",
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                # Keep every checkpoint of a running trial: with num_to_keep, Tune deletes the checkpoint
                # its last experiment snapshot names before the next snapshot is written, and a driver
                # killed in between cannot resume that trial. Finished trials are pruned to their last.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                stop=budget, callbacks=[callback], verbose=verbose),
        )
    # Tuner.restore unpickles the RunConfig it saved, callbacks included: that callback's tracker holds the
    # journal counters of the killed driver. Replace it with this run's (Tune has no public setter).
    if resume:
        tuner._local_tuner._run_config.callbacks = [callback]
    try:
        results = tuner.fit()
    except KeyboardInterrupt:
        interrupted = True
        results = None
    table = None
    if results is not None:
        table, _ = load_trial_tables(spec)
        unfinished = table[~table["status"].isin(["completed", "stopped", "errored"])] if len(table) else table
        # A spent time budget ends the search normally, with fewer trials than the cap.
        all_ran = len(table) >= total_trials(spec) or read_search_time(ledger)["spent"]
        interrupted = interrupted or len(unfinished) > 0 or not all_ran
    tracker.finish_study("KILLED" if interrupted else "FINISHED")
    return StudyOutcome(spec.name, folder, uri, experiment, table, interrupted, time.perf_counter() - t0)


def experiment_path(spec: StudySpec) -> str:
    return f"{spec.storage.rstrip('/')}/{spec.name}/tune"


def load_trial_tables(spec: StudySpec):
    """(trials, history) DataFrames of a study's search, read from Tune's experiment state.

    ``trials``: one row per trial with its parameters, how it ended, its best epoch's metrics and total
    training seconds. ``history``: one row per trial-epoch.
    """
    import pandas as pd

    analysis = tune.ExperimentAnalysis(experiment_path(spec))
    rows, histories = [], []
    for trial in analysis.trials:
        history = analysis.trial_dataframes.get(trial.trial_id)
        row: dict[str, Any] = {"trial_id": trial.trial_id}
        row.update(spec.trial_config(trial.config).model_dump(mode="json", exclude={"dataset"}))
        for name in spec.space:  # a conditional parameter this trial never sampled has no value
            if name not in trial.config:
                row[name] = None
        epochs = int(history["epoch"].max()) if history is not None and "epoch" in history else 0
        if trial.status == "ERROR":
            row["status"] = "errored"
            row["error"] = error_reason(trial)[:300]
        elif trial.status == "TERMINATED":
            row["status"] = "completed" if epochs >= spec.asha.max_epochs else "stopped"
        else:
            row["status"] = trial.status.lower()
        row["epochs"] = epochs
        if history is not None and spec.metric in history and len(history):
            best_index = history[spec.metric].idxmax() if spec.mode == "max" else history[spec.metric].idxmin()
            best = history.loc[best_index]
            row.update({k: float(best[k]) for k in REPORTED if k in best and k != "epoch"})
            row["best_epoch"] = int(best["epoch"])
            row["train_seconds"] = float(history["train_seconds"].sum())
            # A trial retried after a lost node may report the epoch it was in twice (Tune registers a checkpoint
            # only after it has handled the result); the curve keeps the run that led on.
            frame = history[[k for k in REPORTED if k in history]].drop_duplicates("epoch", keep="last")
            frame.insert(0, "inject", row["inject"])
            frame.insert(0, "trial_id", trial.trial_id)
            histories.append(frame)
        rows.append(row)
    history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    return pd.DataFrame(rows), history


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


__all__ = ["StudyOutcome", "describe_budget", "run_study", "study_dir", "tracking_uri", "shutdown"]
