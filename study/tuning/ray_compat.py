"""Every place the project relies on Ray's private behaviour, in one module, checked when it is imported.

Ray is pinned (pyproject.toml) because of what is here. On import this module checks the Ray version and the
signatures of the private methods it patches, and fails loudly on a mismatch rather than letting a study run
with a workaround that silently stopped applying. What is relied on:

* ``TuneController._process_trial_failure``: a node's death reported twice loses a trial
  (``drop_duplicate_actor_failures``); the same patch makes a trial that failed for a full disk stop the driver
  instead of being retried.
* ``ray.train._internal.storage._upload_to_fs_path``, which copies the driver's experiment snapshot over the
  stored one in place, so a full disk left it torn: each file is now written beside its target and renamed
  (``atomic_experiment_uploads``).
* ``TuneController.save_to_dir``, which rewrote ``experiment_state-*.json`` in place in the driver's staging
  folder while the previous snapshot's upload (a background thread) could be copying it: it is now written
  beside itself and renamed (``atomic_experiment_state_writes``).
* The loggers ``ray.tune.execution.tune_controller`` and ``ray.tune.execution.experiment_state``, which print a
  traceback for each write a full disk refuses (``quiet_full_disk_logs``).
* ``TuneController.resume`` and the search generator's pickled ``Experiment`` (``_experiment.storage``, also its
  ``spec["storage"]``): trials proposed after a restore get the storage of the folder the study is in now, not
  the one it was first run in (``new_trials_where_the_study_is_now``).
* ``TuneController._set_trial_status`` and ``_checkpoint_manager._should_force_sync_up``: snapshot the
  experiment whenever a trial starts or ends (``snapshot_on_trial_start_and_end``).
* ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``: a local Ray that listens on loopback only (``ensure_ray``).
* The core worker's SIGTERM handler in the driver, replaced after ``ray.init`` (``stop_on_sigterm``).
* The trial's storage context, ``tune.get_context().get_storage()`` (``ray.train._internal.storage.StorageContext``):
  its ``trial_fs_path`` and ``storage_filesystem``, where a trial finds its own checkpoints and leaves its
  ``diverged.txt`` (``study.tuning.trainable``).
* Tune's trial folder layout (``checkpoint_NNNNNN/``, ``params.json``, ``result.json``,
  ``experiment_state-*.json``), read by ``study.records.trial_tables``.

``calls`` counts how often each patch ran: tests/test_ray_compat.py drives a real Tuner and checks that Tune
still calls the patched methods.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import inspect
import logging
import os
import posixpath
from collections import Counter
from collections.abc import Iterator

import pyarrow.fs as pafs
import ray
import ray.train._internal.storage as storage_module
from ray._private import ray_constants
from ray.exceptions import RayActorError
from ray.train._internal.storage import StorageContext
from ray.tune.execution.tune_controller import TuneController
from ray.tune.experiment import Trial

from study.records.files import is_disk_full

log = logging.getLogger(__name__)

RAY_VERSION = "2.60.0"  # the version every workaround below was written against and tested with
_EXPECTED = {
    "_process_trial_failure": ["self", "trial", "exception"],
    "_set_trial_status": ["self", "trial", "status"],
    "resume": ["self", "resume_config"],
    "save_to_dir": ["self"],
    "_get_trial_checkpoints": ["self"],
}

calls: Counter[str] = Counter()  # patch name -> times Tune called it in this process


def check_ray() -> None:
    """Fail if this Ray is not the one the workarounds were written for (see the module docstring)."""
    if ray.__version__ != RAY_VERSION:
        raise ImportError(f"caption-study needs Ray {RAY_VERSION} (pinned in pyproject.toml), found {ray.__version__}: "
                          "study/tuning/ray_compat.py patches private parts of Tune that move between releases")
    for name, params in _EXPECTED.items():
        method = getattr(TuneController, name, None)
        found = list(inspect.signature(method).parameters) if method is not None else None
        if found != params:
            raise ImportError(f"Ray {ray.__version__}: TuneController.{name} is {found}, expected {params}; "
                              "the workaround in study/tuning/ray_compat.py no longer applies")
    storage = inspect.signature(StorageContext.__init__).parameters
    if not hasattr(StorageContext, "trial_fs_path") or "storage_filesystem" not in storage:
        raise ImportError(f"Ray {ray.__version__}: StorageContext has no trial_fs_path/storage_filesystem; the "
                          "trainable (study/tuning/trainable.py) cannot find its own checkpoints")
    upload = list(inspect.signature(storage_module._upload_to_fs_path).parameters)
    if upload != ["local_path", "fs", "fs_path", "exclude"]:
        raise ImportError(f"Ray {ray.__version__}: ray.train._internal.storage._upload_to_fs_path is {upload}; "
                          "atomic_experiment_uploads no longer applies")
    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        raise ImportError("ray._private.ray_constants.ENABLE_RAY_CLUSTER is gone: ensure_ray cannot keep a local "
                          "Ray on loopback")


check_ray()


def install() -> None:
    """Install the Tune patches (idempotent; ``run_study`` calls it once per study)."""
    drop_duplicate_actor_failures()
    snapshot_on_trial_start_and_end()
    quiet_full_disk_logs()
    atomic_experiment_state_writes()
    atomic_experiment_uploads()
    new_trials_where_the_study_is_now()


def new_trials_where_the_study_is_now() -> None:
    """Give the trials a restored search proposes the storage of the folder the study is in now.

    ``Tuner.restore`` moves the trials it restores to the folder it was given (``TuneController._restore_trials``),
    but the search generator's state is a pickle of its ``Experiment``, whose ``StorageContext`` names the folder
    the study was first run in. A copied study's new trials then wrote their checkpoints into the original, and a
    moved one's failed with "Unable to set up cluster storage" (issue 33, item 1). After the restore this sets the
    experiment's storage to the controller's, as Tune does for the restored trials."""
    original = TuneController.resume
    if getattr(original, "moves_new_trials", False):
        return

    def resume(self, resume_config):
        calls["resume"] += 1
        original(self, resume_config)
        experiment = getattr(self._search_alg, "_experiment", None)
        old = getattr(experiment, "storage", None)
        if old is None or (old.storage_fs_path, old.experiment_dir_name) == (
                self._storage.storage_fs_path, self._storage.experiment_dir_name):
            return
        moved = copy.copy(old)
        moved.storage_filesystem = self._storage.storage_filesystem
        moved.storage_fs_path = self._storage.storage_fs_path
        moved.experiment_dir_name = self._storage.experiment_dir_name
        experiment.storage = moved
        experiment.spec["storage"] = moved

    resume.moves_new_trials = True
    TuneController.resume = resume


def drop_duplicate_actor_failures() -> None:
    """Work around a race in Ray 2.60's Tune that loses a trial when a node dies (seen in the 2-node kill test).

    A trial handed a cached actor waits PENDING for its ``reset`` call. When that actor's node dies, Tune
    reports the one failure twice: its actor-died handler requeues the trial (counting one retry), then the
    ``reset`` future's error arrives for the requeued trial and marks it ERROR for good, whatever
    ``max_failures`` says. The trial also stays in the controller's "resetting" set, so it could never be given
    an actor again. This drops the second report and clears that flag. The test of a killed node proves it still works.
    """
    original = TuneController._process_trial_failure
    if getattr(original, "drops_duplicate_actor_failures", False):
        return

    def process_trial_failure(self, trial, exception):
        calls["process_trial_failure"] += 1
        if is_disk_full(exception):
            # Every retry would fail the same way and each would print a traceback: stop the driver, which says
            # so in one sentence (study.cli.study_commands.fail_on_full_disk); the trial resumes from its last
            # checkpoint.
            raise OSError(errno.ENOSPC, f"No space left on device: trial {trial} could not write its files")
        if isinstance(exception, RayActorError):
            self._resetting_trials.discard(trial)
            if trial.status == Trial.PENDING and trial not in self._trial_to_actor:
                log.info("trial %s: its dead actor was reported twice; it is already queued to retry", trial)
                return
        original(self, trial, exception)

    process_trial_failure.drops_duplicate_actor_failures = True
    TuneController._process_trial_failure = process_trial_failure


def atomic_experiment_uploads() -> None:
    """Upload Tune's experiment snapshot (``experiment_state-*.json``, the searchers' state, ``tuner.pkl``, the
    trials' ``result.json``) file by file through a temporary name beside each target, renamed over it once whole.

    Tune copies the driver's staging folder over the stored one in place, so a write the disk refused left a torn
    file where the last good one was, and neither ``study resume`` nor the readers could read the study again.
    Now a refused upload leaves the previous snapshot whole (and its temporary file removed). Only the snapshot's
    upload (a whole folder, nothing excluded) is changed; checkpoints go to a new folder each and are checked on
    restore (``study.tuning.trainable.restore_source``)."""
    original = storage_module._upload_to_fs_path
    if getattr(original, "uploads_atomically", False):
        return

    def upload(local_path: str, fs, fs_path: str, exclude=None) -> None:
        calls["upload_to_fs_path"] += 1
        if exclude or not os.path.isdir(local_path):
            return original(local_path, fs, fs_path, exclude)
        for folder, _, names in os.walk(local_path):
            relative = os.path.relpath(folder, local_path)
            target_folder = fs_path if relative == "." else posixpath.join(fs_path, *relative.split(os.sep))
            fs.create_dir(target_folder, recursive=True)
            for name in names:
                if name.startswith("."):  # a temporary being written (Tune's and ours): the next upload has it
                    continue
                target = posixpath.join(target_folder, name)
                partial = posixpath.join(target_folder, f".{name}.upload-{os.getpid()}")
                try:
                    pafs.copy_files(os.path.join(folder, name), partial, destination_filesystem=fs)
                    fs.move(partial, target)
                except BaseException:
                    with contextlib.suppress(OSError):
                        fs.delete_file(partial)
                    raise

    upload.uploads_atomically = True
    storage_module._upload_to_fs_path = upload


def atomic_experiment_state_writes() -> None:
    """Write Tune's ``experiment_state-*.json`` in the driver's staging folder through a temporary name, renamed
    over it once whole, as Tune already writes the search generator's state.

    Tune rewrote it in place (``open(..., "w")``) at each snapshot, before waiting for the previous snapshot's
    upload, which runs in a background thread and copies the staging folder file by file; an upload that read
    the file between the truncation and the write stored it empty or torn, and ``study resume`` could not read
    the study. The upload opens the file once, so it now copies either the old state or the new one, whole.
    The body is Tune's own ``save_to_dir`` but for the write (Ray is pinned; ``check_ray`` checks the
    signatures it uses)."""
    import json
    from pathlib import Path

    from ray.tune.utils.serialization import TuneFunctionEncoder

    if getattr(TuneController.save_to_dir, "writes_atomically", False):
        return

    def save_to_dir(self) -> None:
        calls["save_to_dir"] += 1
        runner_state = {"trial_data": list(self._get_trial_checkpoints().values()),
                        "runner_data": self.__getstate__(), "stats": {"start_time": self._start_time}}
        staging = Path(self._storage.experiment_driver_staging_path)
        staging.mkdir(parents=True, exist_ok=True)
        target = staging / self.experiment_state_file_name
        partial = staging / f".{target.name}.writing-{os.getpid()}"  # a dotfile: no upload copies it
        with open(partial, "w") as f:
            json.dump(runner_state, f, cls=TuneFunctionEncoder)
        os.replace(partial, target)
        self._search_alg.save_to_dir(str(staging), session_str=self._session_str)
        self._callbacks.save_to_dir(str(staging), session_str=self._session_str)

    save_to_dir.writes_atomically = True
    TuneController.save_to_dir = save_to_dir


class _DropFullDiskTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and is_disk_full(record.exc_info[1]))


def quiet_full_disk_logs() -> None:
    """Drop the tracebacks Tune logs for a write a full disk refused (a trial's checkpoint, the experiment
    snapshot): the study stops and says so in one sentence; any other error is logged as Tune logs it."""
    for name in ("ray.tune.execution.tune_controller", "ray.tune.execution.experiment_state"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropFullDiskTracebacks) for f in logger.filters):
            logger.addFilter(_DropFullDiskTracebacks())


def snapshot_on_trial_start_and_end() -> None:
    """Make Tune snapshot its experiment state whenever a trial starts, ends or errors.

    Tune snapshots at most every 10 s (its "auto" period, longer for big experiments). A driver killed between
    two snapshots is resumed from the older one: a trial started since then is unknown (its folder is removed
    and its place proposed again), and one that finished since then looks still running. Forcing a snapshot on
    those status changes shrinks that window to the time one snapshot takes to reach storage. The flag set
    here is the one Tune itself sets to force a snapshot, and is honoured at the end of the controller's
    current step, after the trial's own state is updated. Ray is pinned (pyproject.toml) because this touches
    the controller's private state; tests/test_driver_kills.py's kill test proves it still works."""
    original = TuneController._set_trial_status
    if getattr(original, "snapshots_on_trial_status", False):
        return

    def set_trial_status(self, trial, status):
        calls["set_trial_status"] += 1
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
    beyond loopback (tests/test_offline_study.py checks every socket Ray's processes listen on)."""
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    # Ray's start-up lines ("Started a local Ray instance", the token notice) only with study --verbose.
    level = logging.ERROR if os.environ.get("STUDY_QUIET") else logging.INFO
    if address is not None:
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env, logging_level=level)
    else:
        cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            ray.init(address="local", log_to_driver=False, include_dashboard=False, runtime_env=runtime_env,
                     logging_level=level)
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
    stop_on_sigterm()


def stop_on_sigterm() -> None:
    """Make SIGTERM (what ``timeout``, a cluster scheduler or ``kill`` send) stop the driver as Ctrl-C does.

    ``ray.init`` installs the core worker's own SIGTERM handler in the driver, which aborts it with a C++ stack
    dump (exit 134) and no chance to say how to resume. This handler, installed after it, re-sends the signal as
    SIGINT to this process: Tune then stops the experiment gracefully (or Python raises KeyboardInterrupt), and
    the CLI exits 143 with the resume hint (``terminated()``)."""
    import signal

    def as_interrupt(signum, frame) -> None:
        _TERMINATED.append(signum)
        os.kill(os.getpid(), signal.SIGINT)

    signal.signal(signal.SIGTERM, as_interrupt)


_TERMINATED: list[int] = []


def terminated() -> bool:
    """Whether this driver was asked to stop by SIGTERM (exit 143, not Ctrl-C's 130)."""
    return bool(_TERMINATED)


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """``ensure_ray(address)`` for the work inside, ``shutdown()`` after it (the confirm stage's Ray tasks)."""
    ensure_ray(address)
    try:
        yield
    finally:
        shutdown()
