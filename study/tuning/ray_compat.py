"""Every place the project relies on Ray's private behaviour, in one module, checked when it is imported.

Ray is pinned (pyproject.toml) because of what is here. On import this module checks the Ray version and the
signatures of the private methods it patches, and fails loudly on a mismatch rather than letting a study run
with a workaround that silently stopped applying. What is relied on:

* ``TuneController._process_trial_failure``: a node's death reported twice loses a trial
  (``drop_duplicate_actor_failures``).
* ``TuneController._set_trial_status`` and ``_checkpoint_manager._should_force_sync_up``: snapshot the
  experiment whenever a trial starts or ends (``snapshot_on_trial_start_and_end``).
* ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``: a local Ray that listens on loopback only (``ensure_ray``).
* The core worker's SIGTERM handler in the driver, replaced after ``ray.init`` (``stop_on_sigterm``).
* The trial's storage context, ``tune.get_context().get_storage()`` (``ray.train._internal.storage.StorageContext``):
  its ``trial_fs_path`` and ``storage_filesystem``, where a trial finds its own checkpoints and leaves its
  ``diverged.txt`` (``study.tuning.trainable``).
* Tune's trial folder layout (``checkpoint_NNNNNN/``, ``params.json``, ``result.json``,
  ``experiment_state-*.json``), read by ``study.trial_tables``.

``calls`` counts how often each patch ran: tests/test_ray_compat.py drives a real Tuner and checks that Tune
still calls the patched methods.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections import Counter

import ray
from ray._private import ray_constants
from ray.exceptions import RayActorError
from ray.train._internal.storage import StorageContext
from ray.tune.execution.tune_controller import TuneController
from ray.tune.experiment import Trial

log = logging.getLogger(__name__)

RAY_VERSION = "2.60.0"  # the version every workaround below was written against and tested with
_EXPECTED = {
    "_process_trial_failure": ["self", "trial", "exception"],
    "_set_trial_status": ["self", "trial", "status"],
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
    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        raise ImportError("ray._private.ray_constants.ENABLE_RAY_CLUSTER is gone: ensure_ray cannot keep a local "
                          "Ray on loopback")


check_ray()


def install() -> None:
    """Install both Tune patches (idempotent; ``run_study`` calls it once per study)."""
    drop_duplicate_actor_failures()
    snapshot_on_trial_start_and_end()


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
    beyond loopback (tests/test_integrity.py checks every socket Ray's processes listen on)."""
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
