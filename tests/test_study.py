"""Real Ray Tune studies on small shapes data, tracked in a real MLflow sqlite store.

* a study whose `init` trials diverge (NaN features): they end as errored with the reason, the others finish;
* a driver killed mid-study, then `study resume`: every trial finishes, exactly one MLflow run per trial,
  none left RUNNING; the leaderboard reads it back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml



def _spec(tmp_path: Path, dataset: dict, name: str, methods: list[str], **overrides) -> Path:
    spec = {
        "name": name,
        "dataset": dataset,
        "fixed": {"cell": "lstm", "hidden": 48, "embed": 32, "min_count": 1, "batch_size": 40, "val_images": 20},
        "space": {"inject": {"choice": methods}, "lr": {"loguniform": [3e-3, 1e-2]}},
        "stratify": "inject",
        "search": {"trials": 2 * len(methods), "seed": 1},
        "asha": {"max_epochs": 3, "grace_period": 3, "reduction_factor": 2},
        "resources": {"cpu": 1},
        "storage": str(tmp_path / "runs"),
        "max_failures": 1,
        "confirm": {"top_k": 1, "seeds": 2, "epochs": 2, "beam_size": 2, "margin": 0.05},
    }
    spec.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _dataset(shapes) -> dict:
    return {"kind": "shapes", "images": shapes.images, "image_size": shapes.image_size, "seed": shapes.seed,
            "cache_dir": str(shapes.cache_dir)}


def _trial_runs(tmp_path: Path, name: str):
    from study.tracking import sqlite_uri, study_runs

    parents, trials = study_runs(sqlite_uri(tmp_path / "runs" / name / "mlflow.db"), name)
    return parents, trials


@pytest.mark.slow
def test_diverging_trials_end_errored_with_reason_while_the_study_goes_on(tmp_path, feature_cache_dir):
    from study.config import ShapesDataset
    from study.data.prepare import TokenSetting, prepare
    from study.spec import load_spec
    from study import tuning

    # A separate tiny dataset whose cached features we poison: `init` reads them, `none` never does.
    shapes = ShapesDataset(images=60, image_size=48, seed=11, cache_dir=feature_cache_dir)
    prepared = prepare(shapes, [TokenSetting("word", 20, 1)], need_grid=False, progress=False)
    cache = Path(prepared.info["feature_cache"])
    pooled = np.load(cache / "pooled.npy", mmap_mode="r+")
    pooled[:] = np.inf
    pooled.flush()
    del pooled

    spec_path = _spec(tmp_path, _dataset(shapes), "nan", ["init", "none"],
                      asha={"max_epochs": 2, "grace_period": 2})
    spec = load_spec(spec_path)
    try:
        outcome = tuning.run_study(spec, spec_path, progress=False, verbose=0)
    finally:
        tuning.shutdown()
    table = outcome.trials
    assert len(table) == 4
    init, none = table[table.inject == "init"], table[table.inject == "none"]
    assert (init.status == "errored").all() and init.error.str.contains("became nan|became inf").all()
    assert init.error.str.contains("not retried").all()  # the retries ended at once instead of training again
    assert (none.status == "completed").all()

    _, runs = _trial_runs(tmp_path, "nan")
    assert len(runs) == 4
    failed = runs[runs["tags.status"] == "errored"]
    assert len(failed) == 2 and (failed["status"] == "FAILED").all()
    assert failed["tags.error"].str.contains("training loss became").all()
    assert (runs[runs["tags.status"] == "completed"]["status"] == "FINISHED").all()


def _journal_results(folder: Path) -> int:
    journal = folder / "tracking_journal.jsonl"
    if not journal.exists():
        return 0
    return sum(1 for line in journal.read_text().splitlines() if '"trial_result"' in line)


@pytest.mark.slow
def test_killed_driver_then_resume_finishes_every_trial_once(tmp_path, small_shapes, small_prepared):
    spec_path = _spec(tmp_path, _dataset(small_shapes), "resumable", ["init", "merge"])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "study", "run", str(spec_path), "--no-report"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                              cwd=tmp_path)
    folder = tmp_path / "runs" / "resumable"
    deadline = time.time() + 240
    try:
        while _journal_results(folder) < 3 and driver.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
        assert _journal_results(folder) >= 3, "no trial reported in time"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-study
        driver.wait(timeout=60)
    time.sleep(2)

    proc = subprocess.run([sys.executable, "-m", "study", "resume", "resumable", "--storage",
                           str(tmp_path / "runs"), "--no-report"], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "finished" in proc.stdout

    parents, runs = _trial_runs(tmp_path, "resumable")
    assert len(parents) == 1 and parents.iloc[0]["status"] == "FINISHED"
    assert len(runs) == 4, runs[["tags.mlflow.runName", "status"]]
    assert runs["tags.trial_id"].is_unique
    assert (runs["status"] == "FINISHED").all() and (runs["tags.status"] == "completed").all(), \
        runs[["tags.mlflow.runName", "status", "tags.status", *[c for c in ["tags.error"] if c in runs]]].to_string()
    assert (runs["metrics.epoch_seconds"] > 0).all()
    # Finished trials keep only their last checkpoint (running ones keep all, so a crash can always resume).
    # A folder of a trial lost with the killed driver's last snapshot (it started, no epoch ended) may remain,
    # without any checkpoint: its place was proposed again.
    known = set(runs["tags.trial_id"])
    for trial_dir in (folder / "tune").glob("*-lstm-*"):
        kept = len(list(trial_dir.glob("checkpoint_*")))
        assert kept == (1 if trial_dir.name.rsplit("-", 1)[-1] in known else 0), (trial_dir, kept)

    board = subprocess.run([sys.executable, "-m", "study", "leaderboard", "resumable", "--storage",
                            str(tmp_path / "runs"), "--format", "csv"], capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)
    assert board.returncode == 0, board.stderr
    lines = board.stdout.strip().splitlines()
    assert lines[0].startswith("run,inject") and len(lines) == 3  # header + best of init + best of merge
    assert {line.split(",")[1] for line in lines[1:]} == {"init", "merge"}
    import io

    import pandas as pd

    frame = pd.read_csv(io.StringIO(board.stdout))
    assert (frame["epochs"] == 3).all() and (frame["status"] == "completed").all()  # epochs actually trained

    # Resuming a finished study is harmless: nothing is retrained, nothing duplicated.
    again = subprocess.run([sys.executable, "-m", "study", "resume", "resumable", "--storage",
                            str(tmp_path / "runs"), "--no-report"], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    _, runs_after = _trial_runs(tmp_path, "resumable")
    assert len(runs_after) == 4
    info = json.loads((folder / "study.json").read_text())
    assert info["tracking_uri"] is None  # the default store: the mlflow.db in the folder study.json is read from

    # The confirm stage + report, interrupted after its first finished run, then run again.
    report_cmd = [sys.executable, "-m", "study", "report", "resumable", "--storage", str(tmp_path / "runs")]
    confirm = folder / "confirm"
    first = subprocess.Popen(report_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                             cwd=tmp_path, env=env)
    deadline = time.time() + 300
    try:
        while not list(confirm.glob("*.json")) and first.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert first.poll() is None, first.stdout.read().decode()[-3000:]
        time.sleep(0.2)
        done_before = {p.name: p.stat().st_mtime_ns for p in confirm.glob("*.json")}
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    assert 1 <= len(done_before) < 4
    time.sleep(2)
    second = subprocess.run(report_cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert second.returncode == 0, (second.stdout[-3000:], second.stderr[-3000:])
    results = {p.name: p for p in confirm.glob("*.json")}
    assert sorted(results) == ["init-r1-s0.json", "init-r1-s1.json", "merge-r1-s0.json", "merge-r1-s1.json"]
    for name, mtime in done_before.items():  # finished confirm runs were not trained again
        assert results[name].stat().st_mtime_ns == mtime
    from study import tuning
    from study.spec import load_spec

    trials, _ = tuning.load_trial_tables(load_spec(spec_path))
    best_init = trials[trials.inject == "init"].sort_values("val_CIDEr-D").iloc[-1]
    retrained = json.loads(results["init-r1-s0.json"].read_text())
    assert retrained["config"]["lr"] == pytest.approx(best_init["lr"]) and retrained["config"]["epochs"] == 2
    assert {"CIDEr-D", "BLEU-4", "METEOR", "ROUGE-L"} <= set(retrained["per_image"])

    report = folder / "report" / "report.md"
    assert f"report: {report}" in second.stdout and report.is_file()
    text = report.read_text()
    assert "## Verdict" in text and "init" in text and "merge" in text and "methods.png" in text
    parents, _ = _trial_runs(tmp_path, "resumable")
    from study.tracking import get_run_tags, sqlite_uri

    tags = get_run_tags(sqlite_uri(folder / "mlflow.db"), parents.iloc[0]["run_id"])
    assert tags["verdict"] in {"competes", "does not compete", "inconclusive: more seeds needed"}
    from study.tracking import confirm_runs

    # One child run per confirm run, each with its checkpoint, however often the confirm stage was started.
    logged = confirm_runs(sqlite_uri(folder / "mlflow.db"), "resumable")
    expected = [f"confirm-{name.removesuffix('.json')}" for name in sorted(results)]
    assert sorted(logged["tags.mlflow.runName"]) == expected
    assert all((confirm / name.replace(".json", ".pt")).is_file() for name in results)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_dead_tracking_server_does_not_kill_the_study_and_sync_logs_everything_later(tmp_path, small_shapes,
                                                                                     small_prepared):
    from study import tuning
    from study.spec import load_spec
    from study.tracking import study_runs

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"  # nothing listens here yet: the server is "down"
    spec_path = _spec(tmp_path, _dataset(small_shapes), "offline", ["init", "none"],
                      search={"trials": 2, "seed": 0}, asha={"max_epochs": 1, "grace_period": 1},
                      tracking={"uri": uri})
    spec = load_spec(spec_path)
    try:
        with pytest.warns(RuntimeWarning, match="not reachable.*study sync"):
            outcome = tuning.run_study(spec, spec_path, progress=False, verbose=0)
    finally:
        tuning.shutdown()
    assert (outcome.trials.status == "completed").all() and len(outcome.trials) == 2
    journal = tmp_path / "runs" / "offline" / "tracking_journal.jsonl"
    events = [json.loads(line)["kind"] for line in journal.read_text().splitlines()]
    assert events.count("trial_result") == 2 and events[-1] == "study_end"

    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 90
        synced = None
        while time.time() < deadline:
            synced = subprocess.run([sys.executable, "-m", "study", "sync", "offline", "--storage",
                                     str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
            if synced.returncode == 0:
                break
            time.sleep(2)
        assert synced is not None and synced.returncode == 0, synced.stderr[-2000:]
        assert "sent" in synced.stdout
        parents, runs = study_runs(uri, "offline")
        assert len(parents) == 1 and parents.iloc[0]["status"] == "FINISHED"
        assert len(runs) == 2 and (runs["status"] == "FINISHED").all()
        assert runs["metrics.val_CIDEr-D"].notna().all()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_resume_deletes_the_folders_of_trials_lost_with_the_last_snapshot_and_nothing_else(tmp_path):
    """Seen in clean-clone CI runs: a lost trial's folder can hold Tune's params.json, or (driver killed
    earlier) only the checkpoints the trial wrote itself. Both go; known trials and other folders stay."""
    from study import tuning
    from study.spec import load_spec

    spec = load_spec(_spec(tmp_path, {"kind": "shapes", "images": 60}, "lost", ["init"]))
    tune_dir = Path(tuning.experiment_path(spec))
    folders = {
        "init-lstm-1x48-word-aaaa0001": ["params.json", "checkpoint_000000/model.pt"],  # known: kept
        "init-lstm-1x48-word-bbbb0002": ["params.json", "checkpoint_000000/model.pt"],  # lost, synced
        "init-lstm-1x48-word-cccc0003": ["checkpoint_000000/model.pt", "checkpoint_000001/model.pt"],  # lost
        "notes": ["readme.txt"],  # not a trial's folder
    }
    for name, files in folders.items():
        for file in files:
            (tune_dir / name / file).parent.mkdir(parents=True, exist_ok=True)
            (tune_dir / name / file).write_text("x")
    tuning.remove_lost_trial_folders(spec, known={"aaaa0001"})
    assert sorted(p.name for p in tune_dir.iterdir()) == ["init-lstm-1x48-word-aaaa0001", "notes"]


def _checkpoint(folder: Path, epochs: int, complete: bool = True) -> None:
    """A trial checkpoint folder as the trainable writes it: checkpoint.pt (a zip archive, as torch.save
    writes) and history.json with the epochs so far."""
    import zipfile

    folder.mkdir(parents=True)
    (folder / "history.json").write_text(json.dumps([{"epoch": e} for e in range(1, epochs + 1)]))
    with zipfile.ZipFile(folder / "checkpoint.pt", "w") as archive:
        archive.writestr("data.pkl", b"x" * 100)
    if not complete:  # cut short by a kill while Tune copied it
        data = (folder / "checkpoint.pt").read_bytes()
        (folder / "checkpoint.pt").write_bytes(data[: len(data) // 2])


def test_a_resumed_trial_continues_from_its_newest_complete_checkpoint_whatever_the_snapshot_named(tmp_path):
    """Tune's snapshot can lag behind a trial killed with its driver: it may name an older checkpoint, a
    pruned one, or none. The trial continues from the newest complete checkpoint in its folder, by the epochs
    it holds (Tune numbers checkpoints on from its own count after such a restore), never a cut-short one."""
    import pyarrow.fs as pafs
    from ray import tune

    from study.tuning import restore_source

    fs = pafs.LocalFileSystem()
    trial = tmp_path / "init-lstm-1x48-word-aaaa0001"
    _checkpoint(trial / "checkpoint_000001", 2)
    _checkpoint(trial / "checkpoint_000002", 4)  # numbered by Tune after a restore from epoch 3's
    _checkpoint(trial / "checkpoint_000003", 3)
    _checkpoint(trial / "checkpoint_000004", 5, complete=False)
    (trial / "checkpoint_000000").mkdir()  # pruned after the trial finished: emptied, kept while a snapshot names it
    (trial / "checkpoint_000000" / "pruned.txt").write_text("pruned")
    newest = str(trial / "checkpoint_000002")
    for named in (None, tune.Checkpoint(str(trial / "checkpoint_000001")),
                  tune.Checkpoint(str(trial / "checkpoint_000000")),
                  tune.Checkpoint(str(trial / "checkpoint_000009"))):  # none, older, pruned, gone
        assert restore_source(named, fs, str(trial)).path == newest
    assert restore_source(None, fs, str(tmp_path / "no-checkpoints-left")) is None
