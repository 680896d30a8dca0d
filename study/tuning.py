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
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import Searcher

from study.config import TrialConfig
from study.data.prepare import PreparedData, TokenSetting, prepare
from study.registry import any_needs_grid
from study.spec import REPORTED, StudySpec, storage_is_remote
from study.tracking import STORE_FILE, StudyTracker, source_tags, sqlite_uri

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
    return spec.tracking.uri or sqlite_uri(study_dir(spec) / STORE_FILE)


def write_study_file(spec: StudySpec, spec_path: Path) -> Path:
    """``study.json`` lets ``study resume/leaderboard/report NAME`` find the spec, storage and MLflow store.
    The default store is written as ``"tracking_uri": null``: the ``mlflow.db`` beside the file, wherever the
    folder is (``study.tracking.folder_tracking_uri``); only another store is written out."""
    folder = study_dir(spec)
    folder.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(spec)
    info = {"name": spec.name, "spec": str(Path(spec_path).resolve()), "storage": spec.storage,
            "tracking_uri": None if uri == sqlite_uri(folder / STORE_FILE) else uri,
            "experiment": spec.tracking.experiment or spec.name}
    path = folder / "study.json"
    path.write_text(json.dumps(info, indent=2))
    return path


def study_exists(spec: StudySpec) -> bool:
    """Whether a study of this name was started with this storage: its study.json, or Tune state."""
    return (study_dir(spec) / "study.json").is_file() or bool(experiment_states(spec)[1])


def fresh_name(spec: StudySpec) -> str:
    """The first of ``NAME-2``, ``NAME-3``, ... that no study uses yet (for ``study run --new``)."""
    from study.lock import LOCK_FILE

    for n in range(2, 10_000):
        name = f"{spec.name}-{n}"
        candidate = spec.model_copy(update={"name": name})
        if not study_exists(candidate) and not (study_dir(candidate) / LOCK_FILE).exists():
            return name
    raise RuntimeError(f"studies {spec.name}-2 ... {spec.name}-9999 all exist")


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


def define_by_run(spec: StudySpec, fixed: dict[str, Any], trial) -> dict[str, Any]:
    """Sample one point on an Optuna trial: conditional parameters only where their ``when`` holds."""
    sampled = dict(fixed)
    for name, param in spec.space.items():
        if name not in fixed and param.matches({**spec.fixed, **sampled}):
            sampled[name] = _suggest(trial, name, param)
    return sampled


def _sampler(spec: StudySpec, seed: int, fixed: dict[str, Any]):
    import optuna

    if spec.search.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.search.algorithm == "grid":
        grid = {n: list(p.choice) for n, p in spec.space.items() if n not in fixed}
        return optuna.samplers.GridSampler(grid, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(5, spec.trials_per_method // 2)))


class GroupSearch:
    """One Optuna study (TPE, random or grid) proposing the trials of one group: one injection method when the
    study is stratified, else the whole space. Its state is plain data (``state`` / ``from_state``)."""

    def __init__(self, spec: StudySpec, fixed: dict[str, Any], seed: int):
        import optuna

        self.spec, self.fixed, self.seed = spec, dict(fixed), seed
        self.study = optuna.create_study(direction="maximize" if spec.mode == "max" else "minimize",
                                         sampler=_sampler(spec, seed, fixed))
        self.running: dict[str, int] = {}  # Tune trial id -> Optuna trial number, until told
        self.best: dict[str, float] = {}  # best metric so far of each running trial

    def suggest(self, trial_id: str) -> dict[str, Any]:
        trial = self.study.ask()
        self.running[trial_id] = trial.number
        return define_by_run(self.spec, self.fixed, trial)

    def result(self, trial_id: str, value: Any) -> None:
        if trial_id in self.running and _finite(value):
            old = self.best.get(trial_id)
            better = old is None or (value > old if self.spec.mode == "max" else value < old)
            self.best[trial_id] = float(value) if better else old

    def complete(self, trial_id: str, error: bool) -> None:
        """Tell Optuna the trial's best epoch (the leaderboard's definition of a trial's score); an errored
        trial teaches the sampler nothing."""
        from optuna.trial import TrialState

        number = self.running.pop(trial_id, None)
        best = self.best.pop(trial_id, None)
        if number is None:
            return
        if error:
            self.study.tell(number, state=TrialState.FAIL)
        elif best is None:
            self.study.tell(number, state=TrialState.PRUNED)
        else:
            self.study.tell(number, best)

    def state(self) -> dict[str, Any]:
        from optuna.distributions import distribution_to_json

        trials = [{"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
                   "distributions": {k: json.loads(distribution_to_json(d)) for k, d in t.distributions.items()},
                   "system_attrs": t.system_attrs, "user_attrs": t.user_attrs}
                  for t in self.study.get_trials(deepcopy=False)]
        return {"seed": self.seed, "trials": trials, "running": self.running, "best": self.best}

    @classmethod
    def from_state(cls, spec: StudySpec, fixed: dict[str, Any], state: dict[str, Any]) -> "GroupSearch":
        """Rebuild the Optuna study from its told and running trials. The sampler is seeded with (seed, trials
        so far): a fresh sampler with the first seed would propose the study's first points again."""
        import numpy as np
        from optuna.distributions import json_to_distribution
        from optuna.trial import TrialState, create_trial

        trials = sorted(state["trials"], key=lambda t: t["number"])
        seed = int(np.random.SeedSequence([int(state["seed"]), len(trials)]).generate_state(1)[0])
        group = cls(spec, fixed, seed)
        group.seed = int(state["seed"])
        for t in trials:
            trial_state = TrialState[t["state"]]
            group.study.add_trial(create_trial(
                state=trial_state, params=t["params"],
                value=t["value"] if trial_state == TrialState.COMPLETE else None,
                distributions={k: json_to_distribution(json.dumps(d)) for k, d in t["distributions"].items()},
                system_attrs=t["system_attrs"], user_attrs=t["user_attrs"]))
        numbers = [t.number for t in group.study.get_trials(deepcopy=False)]
        if numbers != [t["number"] for t in trials]:
            raise ValueError(f"searcher state: trial numbers {[t['number'] for t in trials]} are not 0..n-1")
        group.running = {str(k): int(v) for k, v in state["running"].items()}
        group.best = {str(k): float(v) for k, v in state["best"].items()}
        return group


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class StudySearcher(Searcher):
    """Tune's searcher for a study: with ``stratify: inject`` one ``GroupSearch`` per injection method and the
    same number of trials each (so no method wins by getting more tuning; suggestions go round-robin to the
    method with the fewest trials so far), else one ``GroupSearch`` for the whole space.

    Tune saves a searcher's state into the storage folder for ``study resume``. This one saves it as JSON (the
    trials told to each Optuna study) and never unpickles anything: storage is often a shared bucket, and
    unpickling a file from there runs whatever code the file holds. Ray's own ``OptunaSearch`` pickles its
    whole state, which is why it is not used here.
    """

    CKPT_FILE_TMPL = "searcher-state-{}.json"  # Tune's restore globs this: an old .pkl is never opened

    def __init__(self, spec: StudySpec):
        super().__init__(metric=spec.metric, mode=spec.mode)
        self.spec = spec
        self.groups = {key: GroupSearch(spec, fixed, spec.search.seed + i)
                       for i, (key, fixed) in enumerate(self._group_fixed().items())}
        self.per_group = spec.trials_per_method if spec.stratify == "inject" else spec.search.trials
        self.counts = {key: 0 for key in self.groups}
        self.owner: dict[str, str] = {}  # Tune trial id -> group

    def _group_fixed(self) -> dict[str, dict[str, Any]]:
        if self.spec.stratify == "inject":
            return {m: {"inject": m} for m in self.spec.methods}
        return {"all": {}}

    def suggest(self, trial_id: str):
        open_groups = [g for g in self.groups if self.counts[g] < self.per_group]
        if not open_groups:
            return Searcher.FINISHED
        group = min(open_groups, key=lambda g: self.counts[g])
        config = self.groups[group].suggest(trial_id)
        self.counts[group] += 1
        self.owner[trial_id] = group
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.owner:
            self.groups[self.owner[trial_id]].result(trial_id, result.get(self.spec.metric))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.owner:
            group = self.groups[self.owner[trial_id]]
            group.result(trial_id, (result or {}).get(self.spec.metric))
            group.complete(trial_id, error)

    def save(self, checkpoint_path: str) -> None:
        state = {"format": 1, "counts": self.counts, "owner": self.owner,
                 "groups": {key: group.state() for key, group in self.groups.items()}}
        Path(checkpoint_path).write_text(json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        fixed = self._group_fixed()
        if state.get("format") != 1 or set(state["groups"]) != set(fixed):
            raise ValueError(f"{checkpoint_path}: not this study's searcher state (groups {sorted(fixed)})")
        self.groups = {key: GroupSearch.from_state(self.spec, fixed[key], state["groups"][key]) for key in fixed}
        self.counts = {key: int(state["counts"][key]) for key in fixed}
        self.owner = {str(k): str(v) for k, v in state["owner"].items()}


def build_searcher(spec: StudySpec) -> Searcher:
    return StudySearcher(spec)


def total_trials(spec: StudySpec) -> int:
    return spec.trials_per_method * len(spec.methods) if spec.stratify == "inject" else spec.search.trials


def build_scheduler(spec: StudySpec):
    if not spec.asha.enabled:
        return FIFOScheduler()
    # Time is the trial's own epoch, not Tune's count of its results: a trial resumed from a checkpoint newer
    # than Tune's snapshot knew (see restore_source) would otherwise reach ASHA's rungs at the wrong epochs.
    return ASHAScheduler(time_attr="epoch", metric=spec.metric, mode=spec.mode,
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
        resume_from, history = None, []
        if checkpoint is not None:
            resume_from = Path(checkpoint.to_directory(os.path.join(tmp, "restored")))
            if (resume_from / HISTORY_FILE).is_file():
                history = json.loads((resume_from / HISTORY_FILE).read_text())
        if history:
            # Tell Tune the restored checkpoint's last epoch first: its result may never have reached the killed
            # driver (the tracker drops it if it did). A trial that had finished ends here without training.
            tune.report(history[-1], checkpoint=tune.Checkpoint.from_directory(str(resume_from)))
            if history[-1]["epoch"] >= cfg.epochs:
                return

        def report(metrics: dict[str, Any], checkpoint_dir: Path) -> None:
            # Every checkpoint carries the trial's epochs so far as plain JSON: which checkpoint is newest,
            # and the study's tables (load_trial_tables), are read from it without loading a model.
            history.append(metrics)
            (checkpoint_dir / HISTORY_FILE).write_text(json.dumps(history))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

        try:
            run_trial(cfg, data, work_dir=Path(tmp), report=report, resume_from=resume_from, progress=False)
        except TrialDiverged as diverged:
            fs.create_dir(storage.trial_fs_path, recursive=True)
            with fs.open_output_stream(diverged_note) as note:
                note.write(str(diverged).encode())
            raise


HISTORY_FILE = "history.json"  # in every trial checkpoint: the list of its epochs' reported metrics


def restore_source(checkpoint, fs, trial_fs_path: str):
    """The checkpoint a retried or resumed trial continues from: the newest complete one in its folder.

    Tune's experiment snapshot can lag behind the trial: after a driver is killed it may name an older
    checkpoint, a pruned one, or none at all although the trial trained (and even finished) several epochs.
    Continuing from any of those would train epochs again, so the trial's own folder decides (Tune's
    checkpoint only when the folder has none)."""
    import pyarrow.fs as pafs

    from study.training import CHECKPOINT_FILE

    found = trial_checkpoints(fs, trial_fs_path)
    if found:
        epoch, newest = found[-1]
        if checkpoint is None or checkpoint.path != newest:
            log.warning("continuing from %s (epoch %d), not Tune's %s", newest, epoch,
                        checkpoint.path if checkpoint is not None else "fresh start")
        return tune.Checkpoint(newest, filesystem=fs)
    if checkpoint is None or checkpoint.filesystem.get_file_info(
            f"{checkpoint.path}/{CHECKPOINT_FILE}").type == pafs.FileType.NotFound:
        return None  # gone or pruned, and nothing else left
    return checkpoint  # written before checkpoints carried history.json


def trial_checkpoints(fs, trial_fs_path: str) -> list[tuple[int, str]]:
    """(epoch, path) of a trial folder's complete checkpoints, oldest first.

    Ordered by the epoch in each one's ``history.json``, not by folder name: a trial restored from a checkpoint
    newer than Tune knew of is numbered on from Tune's count. A checkpoint cut short by a kill (no readable
    history, or a checkpoint.pt that is not a whole zip archive) is left out."""
    import zipfile

    from study.training import CHECKPOINT_FILE

    found = []
    for path in checkpoint_folders(fs, trial_fs_path):
        try:
            with fs.open_input_stream(f"{path}/{HISTORY_FILE}") as fh:
                epochs = json.loads(fh.read())
            with fs.open_input_file(f"{path}/{CHECKPOINT_FILE}") as fh, zipfile.ZipFile(fh) as archive:
                complete = archive.testzip() is None
        except (OSError, ValueError, zipfile.BadZipFile):
            continue
        if complete and epochs:
            found.append((int(epochs[-1]["epoch"]), path))
    return sorted(found)


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
        self.tracker.trial_started(trial.trial_id, self._name(trial), active_params(self.spec, trial.config, params))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        self.last_epoch[trial.trial_id] = epoch
        if not self.tracker.trial_result(trial.trial_id, {k: result[k] for k in REPORTED if k in result}, step=epoch):
            return  # a resumed trial's restored epoch, logged before the driver died
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
        self.tracker.trial_finished(trial.trial_id, status, reason, best=(self.spec.metric, self.spec.mode))
        self.echo(f"{self._name(trial)}  {reason or 'completed'}")
        prune_checkpoints(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
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


PRUNED_NOTE = "pruned.txt"  # all that is left in a checkpoint folder pruned while a snapshot may name it


def prune_checkpoints(trial) -> None:
    """Free the space of all but the newest checkpoint of a finished trial (local folder or s3://, via Tune's
    fs): the one with the most epochs and, of equals, the one Tune registered last.

    The older folders are emptied, not removed, until the study ends (``drop_pruned_checkpoints``): a driver
    killed before Tune's next snapshot leaves one that names an older checkpoint of this trial, and Tune
    refuses to restore a trial whose named checkpoint folder is gone. From an emptied one the trial goes on
    from its newest complete checkpoint (``restore_source``), so it does not train again."""
    import pyarrow.fs as pafs

    fs = trial.storage.storage_filesystem
    registered = trial.checkpoint.path if trial.checkpoint is not None else None
    found = trial_checkpoints(fs, trial.storage.trial_fs_path)
    if not found:
        return
    keep = max(found, key=lambda item: (item[0], item[1] == registered, item[1]))[1]
    for path in checkpoint_folders(fs, trial.storage.trial_fs_path):
        if path != keep and fs.get_file_info(f"{path}/{PRUNED_NOTE}").type == pafs.FileType.NotFound:
            fs.delete_dir_contents(path)
            with fs.open_output_stream(f"{path}/{PRUNED_NOTE}") as note:  # keeps the folder on s3:// too
                note.write(f"pruned: {keep} is this trial's checkpoint\n".encode())


def drop_pruned_checkpoints(spec: StudySpec) -> None:
    """Remove the emptied checkpoint folders of every trial the study's final snapshot shows finished: no
    snapshot can name them any more."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(experiment_path(spec))
    for trial in experiment_trials(spec):
        if trial["status"] in ("TERMINATED", "ERROR"):
            for path in checkpoint_folders(fs, f"{root}/{trial['relative_logdir']}"):
                if fs.get_file_info(f"{path}/{PRUNED_NOTE}").type == pafs.FileType.File:
                    fs.delete_dir(path)


def error_reason(trial) -> str:
    """The last line of a failed trial's traceback (e.g. ``TrialDiverged: training loss became nan ...``),
    from the driver's text copy of the error file (Tune's other copy, ``error.pkl``, is a pickle)."""
    text = ""
    if trial.error_file and os.path.exists(trial.error_file):
        text = Path(trial.error_file).read_text(errors="replace")
    return _last_line(text)


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


def snapshot_on_trial_start_and_end() -> None:
    """Make Tune snapshot its experiment state whenever a trial starts, ends or errors.

    Tune snapshots at most every 10 s (its "auto" period, longer for big experiments). A driver killed between
    two snapshots is resumed from the older one: a trial started since then is unknown (its folder is removed
    and its place proposed again), and one that finished since then looks still running. Forcing a snapshot on
    those status changes shrinks that window to the time one snapshot takes to reach storage. The flag set
    here is the one Tune itself sets to force a snapshot, and is honoured at the end of the controller's
    current step, after the trial's own state is updated. Ray is pinned (pyproject.toml) because this touches
    the controller's private state; tests/test_integrity.py's kill test proves it still works."""
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

    original = TuneController._set_trial_status
    if getattr(original, "snapshots_on_trial_status", False):
        return

    def set_trial_status(self, trial, status):
        changed = trial.status != status
        original(self, trial, status)
        if changed and status in (Trial.RUNNING, Trial.TERMINATED, Trial.ERROR):
            self._checkpoint_manager._should_force_sync_up = True

    set_trial_status.snapshots_on_trial_status = True
    TuneController._set_trial_status = set_trial_status


def ensure_ray(address: str | None) -> None:
    """Join the Ray cluster at ``address``, or (``None``) start a Ray of this driver's own on loopback only.

    A local study always starts its own Ray (``address="local"``): plain ``ray.init()`` joins whatever Ray it
    finds (``RAY_ADDRESS``, or one started by ``ray start``), such as a cluster the user meant for something else.
    Its servers (GCS, raylet, object manager, core workers, the dashboard and runtime-env agents, their metrics
    endpoints) bind to the node's IP address. ``ray.init`` turns a loopback ``_node_ip_address`` into the
    machine's outward address on purpose, and only its single-machine mode (``ENABLE_RAY_CLUSTER`` off, what
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` sets) picks 127.0.0.1 instead; that switch is read when
    ``ray.init`` asks for the node's address, so it is turned off for this call only. With it nothing listens
    beyond loopback (tests/test_integrity.py checks every socket Ray's processes listen on)."""
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    if address is not None:
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
        return
    from ray._private import ray_constants

    cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", log_to_driver=False, include_dashboard=False, runtime_env=runtime_env)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode


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
        tags={**source_tags("study resume" if resume else "study run", spec.description),
              "dataset": str(data.info["dataset"]), "dataset_fingerprint": str(data.info["dataset_fingerprint"]),
              "feature_cache": str(data.info["feature_cache"]), "encoder": str(data.info["encoder"])},
        spec_text=Path(spec_path).read_text() if Path(spec_path).is_file() else None,
        dataset={"name": str(data.info["dataset"]), "digest": str(data.info["dataset_fingerprint"]),
                 "source": str(data.info.get("dataset_json", data.info["dataset"]))})

    ensure_ray(address)
    trainable = tune.with_resources(
        tune.with_parameters(trial_function, spec=spec, data=data),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    callback = TrackingCallback(tracker, spec, echo)

    drop_duplicate_actor_failures()
    snapshot_on_trial_start_and_end()
    ledger = folder / "search_time.json"
    budget = SearchTimeBudget(spec.search.time_budget_h * 3600, ledger) if spec.search.time_budget_h else None
    interrupted = False
    if resume and tune.Tuner.can_restore(experiment_path(spec)):
        tuner = tune.Tuner.restore(experiment_path(spec), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        known = {trial["trial_id"] for trial in experiment_trials(spec)}
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
        drop_pruned_checkpoints(spec)
        export_optuna_studies(spec)
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
    """(trials, history) DataFrames of a study's search, read from the study's own storage; no MLflow, and no
    pickle (``tune.ExperimentAnalysis`` would unpickle parts of the experiment state).

    Which trials the study has, their configs and Tune's status come from the newest experiment-state file,
    read as plain JSON; each trial's epochs come from ``history.json`` in its newest checkpoint, which the trial
    writes itself and a driver crash cannot leave behind (Tune's own result files are copied from the driver
    and can miss epochs after a crash). ``trials``: one row per trial with its parameters, how it ended, its
    best epoch's metrics (best by ``spec.metric``: the one definition of a trial's score, as Optuna is told)
    and total training seconds. ``history``: one row per trial-epoch.
    """
    import pandas as pd
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(experiment_path(spec))
    rows, histories = [], []
    for trial in experiment_trials(spec):
        trial_id, config, folder = trial["trial_id"], trial["config"], f"{root}/{trial['relative_logdir']}"
        history = _trial_history(fs, folder)
        row: dict[str, Any] = {"trial_id": trial_id, "run": f"{spec_run_name(spec, config)}-{trial_id}"}
        row.update(spec.trial_config(config).model_dump(mode="json", exclude={"dataset"}))
        for name in spec.space:  # a conditional parameter this trial never sampled has no value
            if name not in config:
                row[name] = None
        epochs = max((int(m["epoch"]) for m in history), default=0)
        if trial["status"] == "ERROR":
            row["status"] = "errored"
            row["error"] = _last_line(_read_text(fs, f"{folder}/error.txt"))[:300]
        elif trial["status"] == "TERMINATED":
            row["status"] = "completed" if epochs >= spec.asha.max_epochs else "stopped"
        else:
            row["status"] = trial["status"].lower()
        row["epochs"] = epochs
        frame = pd.DataFrame(history, columns=[k for k in REPORTED if any(k in m for m in history)])
        if spec.metric in frame and frame[spec.metric].notna().any():
            best = frame.loc[frame[spec.metric].idxmax() if spec.mode == "max" else frame[spec.metric].idxmin()]
            row.update({k: float(best[k]) for k in REPORTED if k in best and k != "epoch"})
            row["best_epoch"] = int(best["epoch"])
            row["train_seconds"] = float(frame["train_seconds"].sum())
            frame.insert(0, "inject", row["inject"])
            frame.insert(0, "trial_id", trial_id)
            histories.append(frame)
        rows.append(row)
    history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    return pd.DataFrame(rows), history


def _trial_history(fs, folder: str) -> list[dict[str, Any]]:
    """A trial's reported epochs: ``history.json`` of its newest checkpoint, or, for a study started before
    checkpoints carried one, Tune's ``result.json`` (JSON lines; the last report of an epoch wins)."""
    import pyarrow.fs as pafs

    found = trial_checkpoints(fs, folder)
    if found and fs.get_file_info(f"{found[-1][1]}/{HISTORY_FILE}").type == pafs.FileType.File:
        return _read_json(fs, f"{found[-1][1]}/{HISTORY_FILE}")
    if fs.get_file_info(f"{folder}/result.json").type != pafs.FileType.File:
        return []
    with fs.open_input_stream(f"{folder}/result.json") as fh:
        results = [json.loads(line) for line in fh.read().decode().splitlines() if line.strip()]
    by_epoch = {int(r["epoch"]): {k: r[k] for k in REPORTED if k in r} for r in results if "epoch" in r}
    return [by_epoch[e] for e in sorted(by_epoch)]


def export_optuna_studies(spec: StudySpec) -> Path | None:
    """Write the searchers' Optuna studies into ``<study>/optuna.db`` (an Optuna RDB storage, one study per group,
    named ``<study>.<method>``), so ``optuna-dashboard sqlite:///<study>/optuna.db`` and
    ``optuna.load_study(...).trials_dataframe()`` read them. Rebuilt from the searchers' newest JSON state
    (never a pickle) after each search; trials still running then are left out."""
    import optuna
    import pyarrow.fs as pafs
    from optuna.trial import TrialState

    fs, root = pafs.FileSystem.from_uri(experiment_path(spec))
    infos = [i for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
             if i.base_name.startswith("searcher-state-") and i.base_name.endswith(".json")]
    if not infos:
        return None
    state = _read_json(fs, max(infos, key=lambda i: i.mtime_ns or 0).path)
    searcher = StudySearcher(spec)
    fixed = searcher._group_fixed()
    target = study_dir(spec) / "optuna.db"
    tmp = target.with_suffix(".db.tmp")
    tmp.unlink(missing_ok=True)
    storage = f"sqlite:///{tmp}"
    for key, group_state in state["groups"].items():
        group = GroupSearch.from_state(spec, fixed[key], group_state)
        study = optuna.create_study(study_name=f"{spec.name}.{key}", storage=storage,
                                    direction="maximize" if spec.mode == "max" else "minimize")
        study.set_user_attr("metric", spec.metric)  # what each value is (best epoch of the trial)
        study.add_trials([t for t in group.study.get_trials(deepcopy=False) if t.state.is_finished()])
    os.replace(tmp, target)
    return target


def experiment_states(spec: StudySpec) -> tuple[Any, list[str]]:
    """(filesystem, paths) of Tune's experiment-state snapshots of a study, oldest first (one per session)."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(experiment_path(spec))
    return fs, sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
                      if i.base_name.startswith("experiment_state-") and i.base_name.endswith(".json"))


def experiment_trials(spec: StudySpec) -> list[dict[str, Any]]:
    """The trials of Tune's newest experiment-state snapshot (id, config, status, folder), read as plain JSON:
    the pickled fields inside (Tune's ``CLOUDPICKLE_FALLBACK`` values) stay unread strings."""
    fs, states = experiment_states(spec)
    if not states:
        raise FileNotFoundError(f"no Tune experiment state in {experiment_path(spec)}: the study has not started "
                                "a trial yet")
    return [json.loads(json_state) for json_state, _ in _read_json(fs, states[-1])["trial_data"]]


def _read_json(fs, path: str) -> Any:
    with fs.open_input_stream(path) as fh:
        return json.loads(fh.read())


def _read_text(fs, path: str) -> str:
    try:
        with fs.open_input_stream(path) as fh:
            return fh.read().decode(errors="replace")
    except (FileNotFoundError, OSError):
        return ""


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:2000] if lines else "unknown error"


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


__all__ = ["StudyOutcome", "describe_budget", "run_study", "study_dir", "tracking_uri", "shutdown"]
