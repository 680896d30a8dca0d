"""Study integrity (issue 11): the searchers' state is data, never a pickle, and one driver per study (a live lock
refused naming its holder, a stale one taken over). The kills and resumes are in ``test_driver_kills.py``, one
offline study's refusals, dead tracking server and loopback-only Ray in ``test_offline_study.py``, the spec
mistakes found before Ray starts in ``test_spec.py``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from study.spec import load_spec
from tests.helpers import (
    GOOD_SPEC,
    PickleExploit,
    process_group_members,
    wait_for,
)


# ----- item 2: the searchers' state is data, never a pickle -------------------------------------------------
def _searcher_spec(tmp_path: Path):
    path = tmp_path / "spec.yaml"
    path.write_text(GOOD_SPEC.replace("search: {trials: 4}", "search: {trials: 6, seed: 3}"))
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
    (folder / "searcher-state-2026-12-31_00-00-00.pkl").write_bytes(pickle.dumps(PickleExploit(marker)))

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
