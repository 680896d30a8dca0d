"""A driver killed or stopped (issue 11, items 4 and 10): kill -9 twice and nothing is trained twice, SIGTERM
stops as Ctrl-C does, and a study reads its own copy of the spec whatever happens to the YAML later.

Every test drives the real thing: real specs, real Ray, a real MLflow sqlite store, real `shapes` data.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from study.records.trial_tables import load_trial_tables
from study.spec import load_spec
from tests.helpers import (
    PickleExploit,
    journal_events,
    kill_driver_only,
    process_group_members,
    shapes_dataset,
    small_study_spec,
    start_driver,
    study_spec,
    wait_for,
)


# ----- item 4 (with items 1, 2 and 10 on the way): kill -9 twice, nothing trained twice ------------------------
@pytest.mark.slow
def test_a_driver_killed_twice_resumes_without_training_any_epoch_twice(tmp_path, small_shapes, small_prepared):
    import os
    import pickle
    import signal

    from study.records.paths import sqlite_uri
    from study.tracking.mlflow_store import client as mlflow_client
    from study.tracking.mlflow_store import study_runs

    # Three configurations to try first (search.points_to_evaluate): asked before and after the kills, each must
    # run exactly once, in its own method's budget.
    points = [{"inject": "init", "lr": 4e-3}, {"inject": "merge", "lr": 6e-3}, {"inject": "init", "lr": 5e-3}]
    spec_path = small_study_spec(tmp_path, small_shapes, "killed",
                            search={"trials": 6, "seed": 1, "points_to_evaluate": points})
    folder = tmp_path / "runs" / "killed"
    resume = ["resume", "killed", "--storage", str(tmp_path / "runs"), "--no-report"]

    def ended() -> set[str]:
        return {e["trial"] for e in journal_events(folder) if e["kind"] == "trial_end"}

    completed_at_kill, leftovers = [], []
    drivers = [start_driver(["run", str(spec_path), "--no-report"], tmp_path)]
    marker = tmp_path / "pwned"
    try:
        for kill_after in (1, 3):  # kill -9 after the first trial ends, and after the third
            driver = drivers[-1]
            wait_for(lambda: len(ended()) >= kill_after, 300, f"{kill_after} trial ends", process=driver)
            kill_driver_only(driver)
            completed_at_kill.append((len(journal_events(folder)), ended()))
            leftovers.append(process_group_members(driver.pid))
            # A crafted pickle where the old searcher state lived, newer than any real state file.
            (folder / "tune" / "searcher-state-9999-12-31_23-59-59.pkl").write_bytes(
                pickle.dumps(PickleExploit(marker)))
            # The user edits the YAML meanwhile (twice the trials): the study keeps the spec it started with.
            spec_path.write_text(spec_path.read_text().replace("trials: 6", "trials: 12"))
            drivers.append(start_driver(resume, tmp_path))
        final = drivers[-1]
        output, _ = final.communicate(timeout=600)
        assert final.returncode == 0, output[-3000:]
    finally:
        for driver in drivers:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait(timeout=60)

    # The killed drivers' Ray outlived them; each resume took over the stale lock and ended that Ray.
    assert all(leftovers), "a killed driver's Ray should still have been running"
    assert all(process_group_members(driver.pid) == [] for driver in drivers)
    assert "took over a stale lock" in output and "ended" in output
    assert "was edited after this study started" in output and "trials: 6" in (folder / "spec.yaml").read_text()
    assert not marker.exists()  # the pickle was never opened

    # No epoch was trained twice: each trial's epochs reach the journal (and MLflow) once, in order.
    events = journal_events(folder)
    steps: dict[str, list[int]] = {}
    for event in events:
        if event["kind"] == "trial_result":
            steps.setdefault(event["trial"], []).append(event["step"])
    assert len(steps) == 6 and all(s == [1, 2, 3] for s in steps.values()), steps
    # Trials completed before a kill stay completed: none of them reports another epoch afterwards.
    for offset, done in completed_at_kill:
        later = {e["trial"] for e in events[offset:] if e["kind"] == "trial_result" and e["step"] < 3}
        assert not later & done, (later & done, done)
    uri = sqlite_uri(folder / "mlflow.db")
    _, runs = study_runs(uri, "killed")
    assert len(runs) == 6 and runs["tags.trial_id"].is_unique
    assert (runs["status"] == "FINISHED").all() and (runs["tags.status"] == "completed").all()
    client = mlflow_client(uri)
    for run_id in runs["run_id"]:
        history = sorted(client.get_metric_history(run_id, "train_loss"), key=lambda m: (m.timestamp, m.step))
        assert [m.step for m in history] == [1, 2, 3], [m.step for m in history]

    # The study's own tables agree: every trial completed its 3 epochs, each epoch once.
    spec = load_spec(spec_path)
    trials, history = load_trial_tables(spec)
    assert len(trials) == 6 and (trials["status"] == "completed").all() and (trials["epochs"] == 3).all()
    assert len(history) == 18 and not history.duplicated(["trial_id", "epoch"]).any()
    trial_dirs = sorted(p for p in (folder / "tune").iterdir() if p.is_dir())
    assert len(trial_dirs) == 6 and all(len(list(p.glob("checkpoint_*"))) == 1 for p in trial_dirs)
    # The searchers' state was restored from JSON: six trials in all, three per method.
    assert sorted(trials["inject"]) == ["init"] * 3 + ["merge"] * 3
    tried = trials.groupby("inject")["lr"].apply(list)
    assert (tried["init"].count(4e-3), tried["init"].count(5e-3), tried["merge"].count(6e-3)) == (1, 1, 1), tried
    assert len(set(trials["lr"])) == 6  # the other three drawn by the searchers, none a replayed point


@pytest.mark.slow
def test_sigterm_stops_the_driver_as_ctrl_c_does_with_exit_143_and_the_resume_hint(tmp_path, small_shapes,
                                                                                   small_prepared):
    """`kill -TERM` (what `timeout` or a cluster scheduler sends) once ended the driver with Ray's C++ stack dump
    (exit 134) and no word on how to resume."""
    import os
    import signal

    spec_path = small_study_spec(tmp_path, small_shapes, "termed")
    folder = tmp_path / "runs" / "termed"
    driver = start_driver(["run", str(spec_path), "--no-report"], tmp_path)
    try:
        wait_for(lambda: any(e["kind"] == "trial_result" for e in journal_events(folder)), 300, "a trial result",
                 process=driver)
        os.kill(driver.pid, signal.SIGTERM)
        output, _ = driver.communicate(timeout=180)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=60)
    assert driver.returncode == 143, output[-3000:]
    assert "study interrupted" in output and "Resume with:  study resume" in output, output[-3000:]
    assert "SIGTERM received" not in output and "PyMember_GetOne" not in output and "Traceback" not in output
    wait_for(lambda: process_group_members(driver.pid) == [], 60, "the end of the driver's Ray")


def test_a_study_reads_its_own_copy_of_the_spec_whatever_happens_to_the_yaml_later(tmp_path, small_shapes, caplog):
    """`study run` copies the spec into the study folder; opening the study later reads that copy (relative dataset
    paths still taken from where the YAML was) and says so when the YAML has been edited or is gone."""
    from study.study import Study

    dataset = {**shapes_dataset(small_shapes), "cache_dir": "cache"}  # relative to the YAML's folder
    spec_path = study_spec(tmp_path, "copied", dataset, confirm={"top_k": 1, "seeds": 2, "epochs": 1})
    started = Study.from_spec(load_spec(spec_path), spec_path)
    started.paths.write_record(started.name, spec_path, started.spec.storage, started.tracking_uri, started.experiment)
    original = spec_path.read_text()
    assert (started.paths.root / "spec.yaml").read_text() == original

    spec_path.write_text(original.replace("seeds: 2", "seeds: 5"))  # edited for the next study
    with caplog.at_level("WARNING"):
        opened = Study.open(started.paths.root)
    assert opened.spec.confirm.seeds == 2 and opened.spec_text == original
    assert Path(opened.spec.dataset.cache_dir) == tmp_path / "cache"  # resolved from the YAML's folder, not the copy's
    assert "was edited after this study started" in caplog.text and "--new" in caplog.text
    # A second write (a resume) never replaces the copy with the edited file.
    opened.paths.write_record(opened.name, spec_path, opened.spec.storage, opened.tracking_uri, opened.experiment)
    assert (started.paths.root / "spec.yaml").read_text() == original
    spec_path.unlink()  # the YAML deleted: the study still opens
    assert Study.open(started.paths.root).spec.confirm.seeds == 2
