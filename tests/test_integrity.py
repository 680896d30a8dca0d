"""Study integrity (issue 11): one driver per study, no code run from storage, nothing retrained after a
crash, spec mistakes caught before Ray starts, a dead tracking server harmless, a local Ray on loopback only.

Every test drives the real thing: real specs, real Ray, a real MLflow sqlite store, real `shapes` data.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from study.config import ConfigError
from study.records.trial_tables import load_trial_tables
from study.spec import load_spec
from tests.helpers import journal_events, process_group_members, shapes_dataset, study_spec, wait_for
from tests.test_spec import GOOD as SPEC  # a small valid spec: init and attention, a conditional parameter
from tests.test_spec import assert_spec_refused


def _points(points: str) -> str:
    return SPEC.replace("search: {trials: 4}", f"search: {{trials: 4, points_to_evaluate: [{points}]}}")


# ----- item 5: spec mistakes found before Ray starts -------------------------------------------------------
@pytest.mark.parametrize("text, needles", [
    (SPEC + "metric: val_cider\n", ["metric", "val_cider", "val_CIDEr-D", "val_loss"]),
    (SPEC + "metric: epoch_seconds\n", ["metric", "epoch_seconds", "allowed"]),
    (SPEC + "metric: val_loss\nmode: max\n", ["mode", "val_loss", "mode: min"]),
    (SPEC + "mode: maxx\n", ["mode", "max", "min"]),
    (SPEC.replace("when: {inject: attention}", "when: {inject: attentoin}"),
     ["space.attention_dim.when.inject", "attentoin", "['init', 'attention']"]),
    (SPEC.replace("when: {inject: attention}", "when: {inject: [init, atention]}"),
     ["space.attention_dim.when.inject", "atention"]),
    (SPEC.replace("fixed: {cell: lstm}", "fixed: {cell: lstm, layers: 1}").replace(
        "when: {inject: attention}", "when: {layers: 2}"), ["when.layers", "fixed to 1"]),
    (SPEC.replace("when: {inject: attention}", "when: {lr: 0.5}"), ["when.lr", "drawn from a continuous range"]),
    # search.points_to_evaluate: a point of the space, in its method's budget
    (_points("{inject: init, lr: 0.5}"),
     ["points_to_evaluate[0]", "lr = 0.5", "outside space.lr"]),
    (_points("{inject: init, hiden: 64}"),
     ["points_to_evaluate[0]", "hiden", "not searched"]),
    (_points("{inject: init, attention_dim: 32}"),
     ["points_to_evaluate[0]", "attention_dim", "sampled only where"]),
    (_points("{inject: init}, {inject: init}, {inject: init}"),
     ["points_to_evaluate", "more points for init than its 2 trials"]),
])
def test_metric_mode_and_when_values_are_checked_when_the_spec_loads(tmp_path, text, needles):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    assert_spec_refused(path, needles)


def test_a_condition_on_a_later_parameter_is_refused_since_it_could_never_hold(tmp_path):
    # Optuna samples space in file order: a `when` naming a parameter listed after it never sees its value.
    path = tmp_path / "spec.yaml"
    in_order = """  inject: {choice: [init, attention]}
  lr: {loguniform: [1.0e-3, 1.0e-2]}
  attention_dim: {choice: [32, 64], when: {inject: attention}}"""
    condition_first = """  attention_dim: {choice: [32, 64], when: {inject: attention}}
  inject: {choice: [init, attention]}
  lr: {loguniform: [1.0e-3, 1.0e-2]}"""
    path.write_text(SPEC.replace(in_order, condition_first))
    with pytest.raises(ConfigError, match="space.attention_dim.when.inject: 'inject' is searched after"):
        load_spec(path)


def test_dry_run_catches_a_bad_metric_and_a_misspelt_condition(tmp_path):
    for i, text in enumerate([SPEC + "metric: val_cider\n",
                              SPEC.replace("when: {inject: attention}", "when: {inject: attentoin}")]):
        path = tmp_path / f"spec{i}.yaml"
        path.write_text(text)
        proc = subprocess.run([sys.executable, "-m", "study", "run", str(path), "--dry-run"], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2, proc.stdout
        assert "val_cider" in proc.stderr or "attentoin" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


# ----- item 2: the searchers' state is data, never a pickle -------------------------------------------------
class _Exploit:
    """Unpickling this runs a shell command that leaves a marker file: what a crafted state file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _searcher_spec(tmp_path: Path):
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.replace("search: {trials: 4}", "search: {trials: 6, seed: 3}"))
    return load_spec(path)


def test_searcher_state_is_json_and_a_pickle_where_the_old_state_was_is_never_opened(tmp_path):
    import json
    import pickle

    from study.tuning.search import StudySearcher

    spec = _searcher_spec(tmp_path)
    searcher = StudySearcher(spec)
    configs = {f"t{i}": searcher.suggest(f"t{i}") for i in range(4)}
    assert sorted(c["inject"] for c in configs.values()) == ["attention", "attention", "init", "init"]
    for epoch, score in ((1, 0.2), (2, 0.5), (3, 0.4)):  # the trial's best epoch (0.5) is what Optuna is told
        searcher.on_trial_result("t0", {"val_CIDEr-D": score, "epoch": epoch})
    searcher.on_trial_complete("t0", {"val_CIDEr-D": 0.4})
    searcher.on_trial_complete("t1", None, error=True)
    searcher.on_trial_result("t2", {"val_CIDEr-D": 0.7})  # t2 and t3 still running when the driver dies

    folder = tmp_path / "tune"
    folder.mkdir()
    searcher.save_to_dir(str(folder), session_str="2026-01-01_00-00-00")
    state_file = folder / "searcher-state-2026-01-01_00-00-00.json"
    state = json.loads(state_file.read_text())  # plain data: a reader needs no code from the file
    assert state["counts"] == {"init": 2, "attention": 2}
    # A crafted pickle under the old name, newer than the JSON: restoring must not open it.
    marker = tmp_path / "pwned"
    (folder / "searcher-state-2026-12-31_00-00-00.pkl").write_bytes(pickle.dumps(_Exploit(marker)))

    restored = StudySearcher(spec)
    restored.restore_from_dir(str(folder))
    assert not marker.exists()
    assert restored.counts == {"init": 2, "attention": 2} and restored.owner == searcher.owner
    for method, group in restored.groups.items():
        before = searcher.groups[method].study.get_trials(deepcopy=False)
        after = group.study.get_trials(deepcopy=False)
        assert [(t.number, t.state, t.params, t.value) for t in after] == \
               [(t.number, t.state, t.params, t.value) for t in before]
    told = {t.params["lr"]: t for t in restored.groups[configs["t0"]["inject"]].study.get_trials()}
    assert told[configs["t0"]["lr"]].value == 0.5 and told[configs["t0"]["lr"]].state.name == "COMPLETE"
    # The running trials are told to the same Optuna trials after the restore, and the budget still holds.
    restored.on_trial_complete("t2", {"val_CIDEr-D": 0.6})
    t2 = {t.params["lr"]: t for t in restored.groups[configs["t2"]["inject"]].study.get_trials()}[configs["t2"]["lr"]]
    assert t2.state.name == "COMPLETE" and t2.value == 0.7  # its best epoch, reported before the restore
    more = [restored.suggest(f"n{i}") for i in range(3)]
    assert sorted(c["inject"] for c in more[:2]) == ["attention", "init"] and more[2] == StudySearcher.FINISHED
    assert all(c["lr"] not in {v["lr"] for v in configs.values()} for c in more[:2])  # no replayed proposals


# ----- item 1: one driver per study -------------------------------------------------------------------------
HOLD_LOCK = """
import subprocess, sys, time
from study.records.lock import acquire
lock = acquire(sys.argv[1], "study run held")
# Stands for the Ray processes a driver starts: same group, and a Ray worker's process title as its command line.
child = subprocess.Popen(["ray::IDLE", "120"], executable="sleep")
# Two processes of the same group that are not Ray's or this platform's, though their command lines hold the
# words "ray" and "study" (issue 33, item 3): never signalled.
others = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", word])
          for word in ("--job=array-42", "notes-casestudy")]
print(child.pid, *(other.pid for other in others), flush=True)
time.sleep(120)
"""


def test_a_live_lock_is_refused_naming_its_holder_and_a_stale_one_is_taken_over_and_cleaned_up(tmp_path):
    import json
    import os
    import signal
    import socket
    import time

    from study.records.lock import LOCK_FILE, StudyInUse, acquire

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)  # a driver leading its own process group, as from a shell
    try:
        child, *others = map(int, holder.stdout.readline().split())
        with pytest.raises(StudyInUse) as err:
            acquire(tmp_path, "study resume t")
        message = str(err.value)
        assert f"PID {holder.pid} on {socket.gethostname()}" in message and "study run held" in message
        assert "one driver per study" in message

        os.kill(holder.pid, signal.SIGKILL)  # kill -9 of the driver alone: its "Ray" (the child) lives on
        holder.wait(timeout=30)
        assert child in process_group_members(holder.pid)
        with acquire(tmp_path, "study resume t") as lock:
            assert lock.took_over and f"PID {holder.pid}" in lock.took_over and "no longer running" in lock.took_over
            assert lock.ended == [child]
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert not (tmp_path / LOCK_FILE).exists()  # released
        wait_for(lambda: child not in process_group_members(holder.pid), 10,
                 "end of the killed driver's child (its \"Ray\"), ended by the lock's takeover")
        assert sorted(process_group_members(holder.pid)) == sorted(others), "an unrelated process was killed"
    finally:
        if process_group_members(holder.pid):  # the holder, or the unrelated processes it left
            os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)

    # A stale lock whose PID now belongs to an unrelated process that leads its own group (PID reuse): taken
    # over, and nothing is signalled, neither that process nor anything in its group (issue 22, item 8).
    stranger = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps({
            "pid": stranger.pid, "host": socket.gethostname(), "started": "long ago", "process_start": "1",
            "group_leader": True, "command": "study run reused"}))
        with acquire(tmp_path, "study resume t") as lock:
            assert "no longer running" in lock.took_over and lock.ended == []
        time.sleep(0.5)
        assert stranger.poll() is None, "an unrelated process whose PID the dead driver had was killed"
    finally:
        stranger.kill()
        stranger.wait(timeout=30)

    # A lock held on another host cannot be checked from here: refused, naming the host.
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then",
                                                  "command": "study run x"}))
    with pytest.raises(StudyInUse, match="PID 1 on elsewhere.*another host"):
        acquire(tmp_path, "study resume t")


# ----- real studies: helpers ----------------------------------------------------------------------------------
def _study_spec(tmp_path: Path, shapes, name: str, **overrides) -> Path:
    """The shared spec with this module's smaller model, 6 trials and a 1-seed, 1-epoch, greedy confirm stage."""
    settings = {
        "fixed": {"cell": "lstm", "hidden": 16, "embed": 16, "min_count": 1, "batch_size": 40, "val_images": 20},
        "search": {"trials": 6, "seed": 1},
        "confirm": {"top_k": 1, "seeds": 1, "epochs": 1, "beam_size": 1, "margin": 0.05},
    }
    return study_spec(tmp_path, name, shapes, **{**settings, **overrides})


ENV = {"PYTHONUNBUFFERED": "1"}


def _driver(args: list[str], cwd: Path) -> subprocess.Popen:
    import os

    # Its own session, as from a shell: the driver leads the process group its Ray joins.
    return subprocess.Popen([sys.executable, "-m", "study", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env={**os.environ, **ENV}, cwd=cwd)


def _kill_driver_only(driver: subprocess.Popen) -> None:
    import os
    import signal

    os.kill(driver.pid, signal.SIGKILL)  # kill -9 of the driver: the Ray it started is left running
    driver.wait(timeout=60)


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
    spec_path = _study_spec(tmp_path, small_shapes, "killed",
                            search={"trials": 6, "seed": 1, "points_to_evaluate": points})
    folder = tmp_path / "runs" / "killed"
    resume = ["resume", "killed", "--storage", str(tmp_path / "runs"), "--no-report"]

    def ended() -> set[str]:
        return {e["trial"] for e in journal_events(folder) if e["kind"] == "trial_end"}

    completed_at_kill, leftovers = [], []
    drivers = [_driver(["run", str(spec_path), "--no-report"], tmp_path)]
    marker = tmp_path / "pwned"
    try:
        for kill_after in (1, 3):  # kill -9 after the first trial ends, and after the third
            driver = drivers[-1]
            wait_for(lambda: len(ended()) >= kill_after, 300, f"{kill_after} trial ends", process=driver)
            _kill_driver_only(driver)
            completed_at_kill.append((len(journal_events(folder)), ended()))
            leftovers.append(process_group_members(driver.pid))
            # A crafted pickle where the old searcher state lived, newer than any real state file.
            (folder / "tune" / "searcher-state-9999-12-31_23-59-59.pkl").write_bytes(
                pickle.dumps(_Exploit(marker)))
            # The user edits the YAML meanwhile (twice the trials): the study keeps the spec it started with.
            spec_path.write_text(spec_path.read_text().replace("trials: 6", "trials: 12"))
            drivers.append(_driver(resume, tmp_path))
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

    spec_path = _study_spec(tmp_path, small_shapes, "termed")
    folder = tmp_path / "runs" / "termed"
    driver = _driver(["run", str(spec_path), "--no-report"], tmp_path)
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


# ----- items 1, 6 and 10 on one real study: refusals, a dead tracking server, a loopback-only Ray -------------
def _listening(root_pid: int) -> list[tuple[str, int, str]]:
    """(address, port, process) of every listening socket of a process and its descendants (its Ray)."""
    import psutil

    root = psutil.Process(root_pid)
    pids = {root_pid} | {p.pid for p in root.children(recursive=True)}
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            try:
                name = psutil.Process(conn.pid).name()
            except psutil.Error:
                name = "?"
            found.append((conn.laddr.ip, conn.laddr.port, name))
    return found


def _loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


@pytest.fixture(scope="module")
def offline_study(tmp_path_factory, small_shapes, small_prepared):
    """`study run --new` of a spec whose study exists, tracked by a server that is down (port 9), with a second
    driver tried while it runs and Ray's listening sockets read meanwhile; then the leaderboard and sync."""
    from types import SimpleNamespace


    tmp = tmp_path_factory.mktemp("offline")
    spec_path = _study_spec(tmp, small_shapes, "offline", search={"trials": 2, "seed": 0},
                            asha={"max_epochs": 1, "grace_period": 1}, tracking={"uri": "http://127.0.0.1:9"})
    from study.study import Study

    offline = Study.from_spec(load_spec(spec_path), spec_path)  # what a started `study run` leaves first:
    offline.paths.write_record(offline.name, spec_path, offline.spec.storage, offline.tracking_uri, offline.experiment)
    (offline.paths.root / "tune").mkdir()  # its search started (one that never did is started again: issue 33)
    storage = ["--storage", str(tmp / "runs")]
    refused = subprocess.run([sys.executable, "-m", "study", "run", str(spec_path)], capture_output=True, text=True,
                             timeout=120, cwd=tmp)
    driver = _driver(["run", str(spec_path), "--new"], tmp)
    folder = tmp / "runs" / "offline-2"
    try:
        wait_for(lambda: any(e["kind"] == "trial_start" for e in journal_events(folder)), 300, "a trial start",
                 process=driver)
        listening = _listening(driver.pid)
        second = subprocess.run([sys.executable, "-m", "study", "resume", "offline-2", *storage], capture_output=True,
                                text=True, timeout=120, cwd=tmp)
        output, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=60)
    board = subprocess.run([sys.executable, "-m", "study", "leaderboard", "offline-2", *storage, "--format", "csv"],
                           capture_output=True, text=True, timeout=120, cwd=tmp)
    sync = subprocess.run([sys.executable, "-m", "study", "sync", "offline-2", *storage], capture_output=True,
                          text=True, timeout=120, cwd=tmp)
    return SimpleNamespace(tmp=tmp, folder=folder, refused=refused, driver=driver, output=output, second=second,
                           listening=listening, board=board, sync=sync)


@pytest.mark.slow
def test_study_run_refuses_an_existing_study_and_new_starts_one_beside_it(offline_study):
    refused = offline_study.refused
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "study offline already exists" in refused.stderr
    assert "study resume offline" in refused.stderr and "--new" in refused.stderr
    assert not any((offline_study.tmp / "runs" / "offline" / "tune").iterdir())  # nothing was added to it
    assert f"starting a new study offline-2 beside it, in {offline_study.folder}" in offline_study.output
    assert (offline_study.folder / "study.json").is_file()


@pytest.mark.slow
def test_a_second_driver_on_a_running_study_refuses_naming_the_holder(offline_study):
    second = offline_study.second
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"PID {offline_study.driver.pid}" in second.stderr and "study run offline-2" in second.stderr
    assert "one driver per study" in second.stderr
    assert not (offline_study.folder / "driver.lock").exists()  # released when the driver ended


@pytest.mark.slow
def test_a_dead_tracking_server_does_not_stop_the_leaderboard_confirm_stage_or_report(offline_study):
    output = offline_study.output
    assert offline_study.driver.returncode == 0, output[-4000:]
    assert "MLflow at http://127.0.0.1:9 is not reachable" in output
    assert "finished" in output and "verdict:" in output
    report = offline_study.folder / "report" / "report.md"
    assert f"report: {report}" in output and report.is_file()
    kinds = [e["kind"] for e in journal_events(offline_study.folder)]  # all kept for `study sync`
    assert kinds.count("trial_result") == 2
    assert {"study_start", "study_end", "study_tags", "study_artifact"} <= set(kinds)
    board = offline_study.board
    assert board.returncode == 0, board.stderr
    lines = board.stdout.strip().splitlines()
    assert lines[0].startswith("run,inject") and sorted(line.split(",")[1] for line in lines[1:]) == ["init", "merge"]
    assert offline_study.sync.returncode == 2 and "still not reachable" in offline_study.sync.stderr


@pytest.mark.slow
def test_a_local_study_ray_listens_on_loopback_only(offline_study):
    listening = offline_study.listening
    assert len(listening) >= 5, listening  # GCS, raylet, agents, workers: Ray was up
    exposed = [entry for entry in listening if not _loopback(entry[0])]
    assert not exposed, exposed


@pytest.mark.slow
def test_the_python_api_reads_the_study_as_typed_frames_like_the_cli(offline_study):
    """`study.load(...)` on the finished study: the same best trials as `study leaderboard`, one confirm row per
    run with test metrics, and the verdict table with roles, all as typed pandas frames (MLflow was down)."""
    import pandas as pd

    import study

    s = study.load("offline-2", storage=offline_study.tmp / "runs")
    trials = s.trials()
    assert len(trials) == 2 and set(trials["status"]) <= {"completed", "stopped"}
    assert pd.api.types.is_float_dtype(trials["val_CIDEr-D"]) and pd.api.types.is_integer_dtype(trials["epochs"])
    assert len(s.history()) == int(trials["epochs"].sum())
    board = s.leaderboard()
    cli_rows = [line.split(",") for line in offline_study.board.stdout.strip().splitlines()[1:]]
    assert list(board["run"]) == [row[0] for row in cli_rows]  # the CLI prints the same frame
    confirm = s.confirm_runs()
    runs = sorted((offline_study.folder / "confirm").glob("*.json"))
    assert len(confirm) == len(runs) > 0 and confirm["CIDEr-D"].between(0, 10).all()
    assert set(confirm["method"]) == set(trials["inject"])
    curves = s.confirm_history()  # each confirm run's epochs, once each
    assert sorted(curves.groupby("run")["epoch"].max().items()) == sorted(zip(confirm["run"], confirm["epochs"]))
    assert not curves.duplicated(["run", "epoch"]).any() and curves["val_CIDEr-D"].between(0, 10).all()
    verdict = s.verdict()
    assert set(verdict.index) == set(trials["inject"]) and verdict.loc["init", "role"] == "target"
    assert verdict.attrs["verdict"] and verdict.attrs["level"] == 0.95
    assert s.per_image()["image_id"].nunique() == int(verdict.loc["init", "images"])


READ_WITHOUT_RAY = """
import sys

import study
from typer.testing import CliRunner

from study.cli.app import app

s = study.load(sys.argv[1], storage=sys.argv[2])
assert len(s.trials()) == 2 and len(s.leaderboard()) == 2 and len(s.confirm_runs()) > 0
assert len(s.confirm_history()) >= len(s.confirm_runs())
board = CliRunner().invoke(app, ["leaderboard", sys.argv[1], "--storage", sys.argv[2]])
assert board.exit_code == 0 and "init" in board.output, board.output
print(sorted(name for name in sys.modules if name == "ray" or name.startswith("ray.")))
"""


@pytest.mark.slow
def test_the_readers_and_study_leaderboard_import_no_ray(offline_study):
    """`study.load(...).trials()`, `.leaderboard()` and `study leaderboard` read Tune's folders as JSON: no Ray."""
    out = subprocess.run([sys.executable, "-c", READ_WITHOUT_RAY, "offline-2", str(offline_study.tmp / "runs")],
                         capture_output=True, text=True, timeout=120, cwd=offline_study.tmp)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
