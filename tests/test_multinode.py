"""A real 2-node Ray cluster on this machine; the worker node is killed mid-study.

Every trial must still finish (retried from its last checkpoint on the surviving node), and MLflow must hold
exactly one finished run per trial.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from study.context import StudyContext
from tests.helpers import journal_events, study_spec, wait_for


def _trials_training_now(folder: Path) -> int:
    """Trials that have reported an epoch and not ended. The head has 1 CPU, so 2 of them means one trains on
    the worker (2 trials that merely reported could both be the head's, one after the other)."""
    reporting, ended = set(), set()
    for event in journal_events(folder):
        if event["kind"] == "trial_result":
            reporting.add(event["trial"])
        elif event["kind"] == "trial_end":
            ended.add(event["trial"])
    return len(reporting - ended)


@pytest.mark.slow
@pytest.mark.cluster
def test_killing_a_worker_node_mid_study_loses_no_trial(tmp_path, small_shapes, small_prepared):
    import ray
    from ray.cluster_utils import Cluster

    from study import tuning
    from study.records.paths import sqlite_uri
    from study.records.trial_tables import experiment_path
    from study.spec import load_spec
    from study.tracking.mlflow_store import study_runs

    spec_path = study_spec(tmp_path, "multi", small_shapes, methods=["init", "par"],
                           fixed={"hidden": 48, "embed": 32, "min_count": 1, "batch_size": 40, "val_images": 20},
                           search={"trials": 4, "seed": 2, "max_concurrent": 2},
                           asha={"max_epochs": 4, "grace_period": 4}, max_failures=3, confirm=None)
    spec = load_spec(spec_path)
    folder = tmp_path / "runs" / "multi"

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    killed, not_killed = threading.Event(), []

    def kill_worker_when_both_nodes_train() -> None:
        try:
            wait_for(lambda: _trials_training_now(folder) >= 2, 300, "2 trials training at once (one on each node)")
        except AssertionError as err:
            not_killed.append(str(err))
            return
        cluster.remove_node(worker, allow_graceful=False)  # kills the worker's raylet and its trials
        killed.set()

    killer = threading.Thread(target=kill_worker_when_both_nodes_train, daemon=True)
    try:
        ray.init(address=cluster.address)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        killer.start()
        outcome = tuning.run_study(StudyContext.from_spec(spec, spec_path), address=cluster.address, progress=False,
                                     verbose=0)
        killer.join(timeout=10)
    finally:
        tuning.shutdown()
        cluster.shutdown()
    assert killed.is_set(), f"the worker was never killed: {not_killed or 'the study ended first'}"

    table = outcome.trials
    assert len(table) == 4 and (table.status == "completed").all(), table[["trial_id", "status"]]

    # At least one trial failed with the node and came back from its last checkpoint, not from scratch. Tune
    # registers a checkpoint only after handling the result that carries it, so each failure may repeat at most
    # the one epoch that was in flight.
    from ray import tune

    analysis = tune.ExperimentAnalysis(experiment_path(spec))
    failures = {t.trial_id: t.run_metadata.num_failures for t in analysis.trials}
    assert sum(failures.values()) >= 1, failures
    for trial_id, frame in analysis.trial_dataframes.items():
        assert frame["epoch"].tolist()[-1] == 4
        epochs = frame["epoch"].tolist()
        assert set(epochs) == {1, 2, 3, 4} and len(epochs) - 4 <= failures[trial_id], (trial_id, epochs, failures)

    _, runs = study_runs(sqlite_uri(folder / "mlflow.db"), "multi")
    assert len(runs) == 4 and runs["tags.trial_id"].is_unique
    assert (runs["status"] == "FINISHED").all() and (runs["tags.status"] == "completed").all()


def test_a_dead_actor_reported_twice_leaves_the_requeued_trial_to_retry():
    """The race above, made deterministic: Tune's actor-died handler has already requeued the trial (PENDING,
    no actor); the failed ``reset`` future of the same dead actor must not then mark it ERROR, and the trial
    must not stay marked as resetting (it could never be given an actor again)."""
    from ray.exceptions import RayActorError
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

    from study.tuning import ray_compat

    ray_compat.drop_duplicate_actor_failures()
    ray_compat.drop_duplicate_actor_failures()  # idempotent: run_study installs it once per study
    trial = Trial("__fake", stub=True, max_failures=3)
    trial.set_status(Trial.PENDING)
    controller = TuneController.__new__(TuneController)  # only the state this path reads
    controller._resetting_trials = {trial}
    controller._trial_to_actor = {}
    controller._process_trial_failure(trial, RayActorError())
    assert trial.status == Trial.PENDING and trial.run_metadata.num_failures == 0
    assert trial not in controller._resetting_trials


@pytest.mark.slow
@pytest.mark.cluster
def test_a_cluster_with_no_node_that_holds_a_trial_refuses_the_study_after_the_stated_wait(tmp_path, small_shapes,
                                                                                           caplog):
    """Two 1-CPU nodes and trials of 2 CPUs: together the cluster has them, but no node does, so no trial could ever
    start. The study waits resources.wait_for_nodes_min (the autoscaler may add a node), says so once, then stops
    naming what a trial asks for and what the nodes have; nothing is written."""
    import time

    from ray.cluster_utils import Cluster

    from study import tuning
    from study.config import ConfigError
    from study.spec import load_spec

    spec_path = study_spec(tmp_path, "toobig", small_shapes, methods=["init"], search={"trials": 1, "seed": 0},
                           asha={"max_epochs": 1, "grace_period": 1}, confirm=None,
                           resources={"cpu": 2, "gpu": 0, "wait_for_nodes_min": 0.05})
    spec = load_spec(spec_path)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        started = time.monotonic()
        with pytest.raises(ConfigError, match=r"each trial asks for 2 CPUs and 0 GPUs on one node, but after 0.05 "
                                              r"min no node .* \(its nodes: 1 CPUs/0 GPUs, 1 CPUs/0 GPUs\)"):
            tuning.run_study(StudyContext.from_spec(spec, spec_path), address=cluster.address, progress=False)
        assert 3 <= time.monotonic() - started < 60  # the stated wait (3 s), not Tune's warnings for ever
        assert caplog.text.count("waiting up to 0.05 min for the autoscaler") == 1
        assert not (tmp_path / "runs" / "toobig").exists()
    finally:
        tuning.shutdown()
        cluster.shutdown()
