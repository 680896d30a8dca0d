"""``run_study``: a study's search, run or resumed.

The data is prepared once in the driver and put into Ray's object store through ``tune.with_parameters`` (so
concurrent trials on a node share one copy); a ``Tuner`` runs the trials with the study's searcher (Optuna, one
per injection method when stratified), ASHA, actor reuse, retries from the last checkpoint, the time budget,
and a callback that mirrors every trial into MLflow through the study tracker.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import ray
from ray import tune

from study.config import ConfigError
from study.configure import configure
from study.context import StudyContext
from study.records import read_search_time
from study.records.files import is_disk_full
from study.records.paths import StudyPaths
from study.records.trial_tables import experiment_states, experiment_trials, load_trial_tables
from study.spec import StudySpec
from study.tracking import StudyTracker, source_tags
from study.tuning import ray_compat
from study.tuning.budget import ArmBudget
from study.tuning.callbacks import (
    SearchProgress,
    SearchTimeBudget,
    SilentTrialProgress,
    TrackingCallback,
    trial_name,
)
from study.tuning.optuna_export import export_optuna_studies
from study.tuning.search import StudySearcher, build_scheduler, total_trials
from study.tuning.trainable import drop_pruned_checkpoints, remove_lost_trial_folders, trial_function

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


@dataclass
class StudyOutcome:
    name: str
    study_dir: Path
    tracking_uri: str
    experiment: str
    trials: Any  # pandas DataFrame, one row per trial
    interrupted: bool
    seconds: float


def trial_slots(spec: StudySpec) -> int:
    """Trials the cluster can run at once now. Tune lets a custom searcher have only one pending trial
    unless told a concurrency, which serialises short trials; on an autoscaling cluster set
    ``search.max_concurrent`` to the size it grows to."""
    resources = ray.cluster_resources()
    slots = resources.get("CPU", 1) / spec.resources.cpu
    if spec.resources.gpu:
        slots = min(slots, resources.get("GPU", 0) / spec.resources.gpu)
    return max(1, int(slots))


def check_local_resources(spec: StudySpec) -> None:
    """A study on this machine alone whose trials ask for more CPUs or GPUs than it has would never start a trial
    (Tune only warns, every minute, for ever): refuse it, naming what the machine has. On a cluster
    (``--address``) the autoscaler may still add nodes, so the study starts and Tune's warnings say what waits."""
    import torch

    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    if spec.resources.cpu > cpus or spec.resources.gpu > gpus:
        raise ConfigError(f"resources: each trial asks for {spec.resources.cpu:g} CPUs and {spec.resources.gpu:g} "
                          f"GPUs, but this machine has {cpus} CPUs and {gpus} GPUs, so no trial could start; lower "
                          "resources: in the spec, or run on a cluster that has them (study run --address ...)")


def wait_for_a_node(spec: StudySpec, address: str, *, poll_s: float = 5.0) -> None:
    """On a cluster (``--address``), wait until some node can hold one trial (its CPUs and GPUs on one node): the
    autoscaler may still be adding it. Say once what is awaited; after ``resources.wait_for_nodes_min`` minutes
    with no such node, refuse the study, naming what a trial asks for and what the nodes have (Tune would only
    warn, every minute, for ever)."""
    cpu, gpu = spec.resources.cpu, spec.resources.gpu

    def nodes() -> list[dict[str, float]]:
        return [n["Resources"] for n in ray.nodes() if n.get("Alive")]

    def fits(node: dict[str, float]) -> bool:
        return node.get("CPU", 0) >= cpu and node.get("GPU", 0) >= gpu

    deadline = time.monotonic() + 60 * spec.resources.wait_for_nodes_min
    if any(fits(n) for n in nodes()):
        return
    log.warning("no node of the cluster at %s can hold a trial yet (each asks for %g CPUs and %g GPUs on one node): "
                "waiting up to %g min for the autoscaler to add one", address, cpu, gpu,
                spec.resources.wait_for_nodes_min)
    while time.monotonic() < deadline:
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        if any(fits(n) for n in nodes()):
            return
    have = ", ".join(f"{n.get('CPU', 0):g} CPUs/{n.get('GPU', 0):g} GPUs" for n in nodes()) or "no live node"
    raise ConfigError(f"resources: each trial asks for {cpu:g} CPUs and {gpu:g} GPUs on one node, but after "
                      f"{spec.resources.wait_for_nodes_min:g} min no node of the cluster at {address} has them (its "
                      f"nodes: {have}), so no trial could start; lower resources: in the spec, or give the cluster "
                      "such nodes (cluster.yaml's worker types), or raise resources.wait_for_nodes_min")


def describe_budget(spec: StudySpec) -> str:
    """The dry-run text: the space and the trial budget."""
    lines = [f"study {spec.name}: {total_trials(spec)} trials, search={spec.search.algorithm}, "
             f"metric={spec.metric} ({spec.mode})"]
    if spec.stratified:
        lines.append(f"  arms (each its own searcher): up to {spec.trials_per_method} trials each"
                     + (f", {spec.search.epochs_per_arm} trial-epochs each" if spec.search.epochs_per_arm else ""))
        arms = spec.arm_set
        lines += [f"    {arms.describe(name)}{' [target]' if name == arms.target else ''}" for name in arms.names]
    for point in spec.search.points_to_evaluate:
        lines.append(f"  tried first: {', '.join(f'{k}={v}' for k, v in point.items())}")
    if spec.search.time_budget_h:
        lines.append(f"  time budget: {spec.search.time_budget_h:g} h of wall time for the search "
                     "(summed over resumes)")
    per_method = spec.asha.enabled and spec.stratified and spec.asha.per_method
    lines.append(f"  ASHA: {'on' if spec.asha.enabled else 'off'}{', one bracket per arm' if per_method else ''}, "
                 f"max {spec.asha.max_epochs} epochs, grace {spec.asha.grace_period}, "
                 f"reduction {spec.asha.reduction_factor}")
    lines.append(f"  epochs at most: {total_trials(spec) * spec.asha.max_epochs}; resources per trial: "
                 f"{spec.resources.cpu:g} CPU, {spec.resources.gpu:g} GPU")
    lines.append("  fixed: " + (", ".join(f"{k}={v}" for k, v in spec.fixed.items()) or "-"))
    precision = spec.fixed.get("precision", "auto")
    if precision == "auto":
        from study.trial.precision import resolve

        device = "cuda" if spec.resources.gpu else "cpu"
        lines.append(f"  precision: auto, {resolve(precision, device)} on this driver's {device} "
                     "(pinned for every trial)")
    lines += space_table(spec)
    uri = StudyPaths.of(spec.storage, spec.name).tracking_uri(spec.tracking.uri)
    lines.append(f"  dataset: {spec.dataset.kind}; storage: {spec.storage}; MLflow: {uri}")
    return "\n".join(lines)


def space_table(spec: StudySpec) -> list[str]:
    """The searched parameters as an aligned table (name, distribution, values or range, condition), for people;
    ``StudySpec.space_description`` keeps the plain dicts for the analysis."""
    rows = [("searched", "kind", "values", "only when")]
    for name, param in spec.space.items():
        desc = param.describe()
        if desc["type"] == "choice":
            values = ", ".join(str(v) for v in desc["values"])
        else:
            values = f"{desc['low']:g} .. {desc['high']:g}" + (f", step {desc['step']:g}" if "step" in desc else "")
        when = "; ".join(f"{key} = {' or '.join(map(str, allowed)) if isinstance(allowed, list) else allowed}"
                         for key, allowed in (param.when or {}).items())
        rows.append((name, desc["type"], values, when))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return [("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3]).rstrip()
            for row in rows]


def _finish(spec) -> pd.DataFrame:
    """After a search that returned: pruned checkpoints dropped, the Optuna export written; the trial table."""
    drop_pruned_checkpoints(spec)
    export_optuna_studies(spec)
    return load_trial_tables(spec)[0]


def _interrupted(spec, paths, table: pd.DataFrame) -> bool:
    """Whether the search stopped before its end: a trial unfinished, or fewer trials than the cap while neither
    the time budget nor every arm's trial-epoch budget is spent (those end a search normally)."""
    unfinished = table[~table["status"].isin(["completed", "stopped", "errored"])] if len(table) else table
    all_ran = (len(table) >= total_trials(spec) or read_search_time(paths.search_time).spent
               or arm_budgets_spent(spec, table))
    return len(unfinished) > 0 or not all_ran


def run_study(ctx: StudyContext, *, address: str | None = None, max_concurrent: int | None = None,
              resume: bool = False, progress: bool = True, verbose: int = 0,
              echo: Callable[[str], None] | None = None) -> StudyOutcome:
    """Run (or, with ``resume``, continue) a study's search. Returns the trial table."""
    configure()  # Tune's settings (study/configure.py), also for a study run from Python
    t0 = time.perf_counter()
    spec, paths, uri, experiment = ctx.spec, ctx.paths, ctx.tracking_uri, ctx.experiment
    # Before anything is written: a refused study leaves no folder behind.
    if address is None:
        check_local_resources(spec)
    else:
        ray_compat.ensure_ray(address)
        wait_for_a_node(spec, address)
    paths.write_record(spec.name, ctx.spec_path, spec.storage, uri, experiment, spec.fixed.get("precision"))
    tracker = ctx.tracker()
    data = ctx.data(progress=progress)  # checked against the dataset the study began with
    _start_tracking(tracker, spec, paths, data.info, resume=resume)

    ray_compat.ensure_ray(address)
    ray_compat.install()
    trainable = tune.with_resources(
        tune.with_parameters(trial_function, spec=spec, data=data),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    ended = 0
    # Tune can restore only from an experiment snapshot: a driver stopped before its first one (a full disk, a
    # kill during start-up) leaves tuner.pkl alone, and that study starts afresh (nothing had been trained).
    restorable = resume and tune.Tuner.can_restore(paths.tune) and bool(experiment_states(spec)[1])
    if restorable:
        ended = sum(t["status"] in ("TERMINATED", "ERROR") for t in experiment_trials(spec))
    progress_bar = SearchProgress(spec, total_trials(spec), ended,
                                  paths.search_time if spec.search.time_budget_h else None,
                                  enabled=progress and echo is not None)
    # Before Tuner.restore: its saved copy attaches to this one.
    callback = TrackingCallback(tracker, spec, echo, progress_bar)
    if restorable:
        tuner = tune.Tuner.restore(paths.tune, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        known = {trial["trial_id"] for trial in experiment_trials(spec)}
        tracker.discard_trials(keep=known)
        remove_lost_trial_folders(spec, known)
    else:
        if resume:
            log.warning("no Tune state at %s yet: starting the study", paths.tune)
        tuner = _new_tuner(spec, paths, trainable, callback, max_concurrent, verbose)
    table = _finish(spec) if _fit(tuner, paths, progress_bar) is not None else None
    interrupted = table is None or _interrupted(spec, paths, table)
    tracker.finish_study("KILLED" if interrupted else "FINISHED")
    return StudyOutcome(spec.name, paths.root, uri, experiment, table, interrupted, time.perf_counter() - t0)


def arm_budgets_spent(spec: StudySpec, table) -> bool:
    """Whether every arm has ended its search: its trial-epochs spent (``search.epochs_per_arm``) or its trials
    all run. Such a search has ended normally, with fewer trials than the cap."""
    if not spec.search.epochs_per_arm or not len(table):
        return False
    return all(table.loc[table["arm"] == arm, "epochs"].sum() >= spec.search.epochs_per_arm
               or (table["arm"] == arm).sum() >= spec.trials_per_method for arm in spec.methods)


def _fit(tuner, paths: StudyPaths, progress_bar: SearchProgress):
    """``tuner.fit()``'s results, or None when the search was interrupted (Ctrl-C, SIGTERM)."""
    try:
        return tuner.fit()
    except KeyboardInterrupt:
        return None
    except tune.TuneError as exc:
        if is_disk_full(exc):  # ray_compat's stop on a full disk, which Tune wraps in its traceback's text
            raise OSError(errno.ENOSPC, f"No space left on device under {paths.root}") from None
        raise
    finally:
        progress_bar.close()


def _start_tracking(tracker: StudyTracker, spec: StudySpec, paths: StudyPaths, info: dict[str, Any], *,
                    resume: bool) -> None:
    """The study's parent run: the search settings, where the code and data came from, and the spec."""
    tracker.start_study(
        params={"trials": total_trials(spec), "search": spec.search.algorithm, "metric": spec.metric,
                "stratify": spec.stratify, "asha_max_epochs": spec.asha.max_epochs, **{
                    f"fixed.{k}": v for k, v in spec.fixed.items()}},
        tags={**source_tags("study resume" if resume else "study run", spec.description),
              "dataset": str(info["dataset"]), "dataset_fingerprint": str(info["dataset_fingerprint"]),
              "feature_cache": str(info["feature_cache"]), "encoder": str(info["encoder"])},
        spec_text=paths.spec_copy.read_text() if paths.spec_copy.is_file() else None,
        dataset={"name": str(info["dataset"]), "digest": str(info["dataset_fingerprint"]),
                 "source": str(info.get("dataset_json", info["dataset"]))})


def _new_tuner(spec: StudySpec, paths: StudyPaths, trainable: Any, callback: TrackingCallback,
               max_concurrent: int | None, verbose: int) -> tune.Tuner:
    hours = spec.search.time_budget_h
    budget = SearchTimeBudget(hours * 3600, paths.search_time) if hours else None
    arm_budget = ArmBudget(spec.search.epochs_per_arm)  # one object: the searcher and the scheduler share it
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=StudySearcher(spec, arm_budget), scheduler=build_scheduler(spec, arm_budget),
            num_samples=total_trials(spec),
            max_concurrent_trials=max_concurrent or spec.search.max_concurrent or trial_slots(spec),
            reuse_actors=True,
            trial_name_creator=functools.partial(trial_name, spec),
            trial_dirname_creator=functools.partial(trial_name, spec)),
        run_config=tune.RunConfig(
            name="tune", storage_path=paths.tune_parent,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            # Keep every checkpoint of a running trial: with num_to_keep, Tune deletes the checkpoint its last
            # experiment snapshot names before the next snapshot is written, and a driver killed in between
            # cannot resume that trial. Finished trials are pruned to their last.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            stop=budget, callbacks=[callback] + ([] if verbose else [SilentTrialProgress()]), verbose=verbose),
    )
