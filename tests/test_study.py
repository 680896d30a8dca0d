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

pytestmark = [pytest.mark.slow]


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
    assert (runs["status"] == "FINISHED").all() and (runs["tags.status"] == "completed").all()
    assert (runs["metrics.epoch_seconds"] > 0).all()

    board = subprocess.run([sys.executable, "-m", "study", "leaderboard", "resumable", "--storage",
                            str(tmp_path / "runs"), "--format", "csv"], capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)
    assert board.returncode == 0, board.stderr
    lines = board.stdout.strip().splitlines()
    assert lines[0].startswith("run,inject") and len(lines) == 3  # header + best of init + best of merge
    assert {line.split(",")[1] for line in lines[1:]} == {"init", "merge"}

    # Resuming a finished study is harmless: nothing is retrained, nothing duplicated.
    again = subprocess.run([sys.executable, "-m", "study", "resume", "resumable", "--storage",
                            str(tmp_path / "runs"), "--no-report"], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    _, runs_after = _trial_runs(tmp_path, "resumable")
    assert len(runs_after) == 4
    info = json.loads((folder / "study.json").read_text())
    assert info["tracking_uri"].endswith("mlflow.db")
