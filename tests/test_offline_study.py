"""One real study run offline (issue 11, items 1, 6 and 10): refusals of an existing study and of a second
driver, a dead tracking server harmless to the leaderboard, the confirm stage and the report, a local Ray on
loopback only, and the readers (Python API and CLI) without Ray.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from study.spec import load_spec
from tests.helpers import (
    journal_events,
    small_study_spec,
    start_driver,
    wait_for,
)


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
    spec_path = small_study_spec(tmp, small_shapes, "offline", search={"trials": 2, "seed": 0},
                            asha={"max_epochs": 1, "grace_period": 1}, tracking={"uri": "http://127.0.0.1:9"})
    from study.study import Study

    offline = Study.from_spec(load_spec(spec_path), spec_path)  # what a started `study run` leaves first:
    offline.paths.write_record(offline.name, spec_path, offline.spec.storage, offline.tracking_uri, offline.experiment)
    (offline.paths.root / "tune").mkdir()  # its search started (one that never did is started again: issue 33)
    storage = ["--storage", str(tmp / "runs")]
    refused = subprocess.run([sys.executable, "-m", "study", "run", str(spec_path)], capture_output=True, text=True,
                             timeout=120, cwd=tmp)
    driver = start_driver(["run", str(spec_path), "--new"], tmp)
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
