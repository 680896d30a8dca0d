"""Real Ray Tune studies on small shapes data, tracked in a real MLflow sqlite store.

* a study whose `init` trials diverge (NaN features): they end as errored with the reason, the others finish;
* a driver killed mid-study, then `study resume`: every trial finishes, exactly one MLflow run per trial,
  none left RUNNING; the leaderboard reads it back; a second resume changes nothing. That study is run once per
  module (`resumed_study`), and its `study report` once, killed after its first confirm run and run again
  (`interrupted_report`); each test checks one behaviour of them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from study.context import StudyContext
from study.records.trial_tables import load_trial_tables
from tests.helpers import journal_events, process_group_members, study_spec, wait_for


def _trial_runs(tmp_path: Path, name: str):
    from study.records.paths import sqlite_uri
    from study.tracking.mlflow_store import study_runs

    parents, trials = study_runs(sqlite_uri(tmp_path / "runs" / name / "mlflow.db"), name)
    return parents, trials


@pytest.mark.slow
def test_diverging_trials_end_errored_with_reason_while_the_study_goes_on(tmp_path, feature_cache_dir, capfd):
    from study import tuning
    from study.config import ShapesDataset
    from study.data.prepare import TokenSetting, prepare
    from study.spec import load_spec

    # A separate tiny dataset whose cached features we poison: `init` reads them, `none` never does.
    shapes = ShapesDataset(images=60, image_size=48, seed=11, cache_dir=feature_cache_dir)
    prepared = prepare(shapes, [TokenSetting("word", 20, 1)], need_grid=False, progress=False)
    cache = Path(prepared.info["feature_cache"])
    pooled = np.load(cache / "pooled.npy", mmap_mode="r+")
    pooled[:] = np.inf
    pooled.flush()
    del pooled

    spec_path = study_spec(tmp_path, "nan", shapes, methods=["init", "none"], asha={"max_epochs": 2, "grace_period": 2})
    spec = load_spec(spec_path)
    try:
        outcome = tuning.run_study(StudyContext.from_spec(spec, spec_path), progress=False, verbose=0)
    finally:
        tuning.shutdown()
    table = outcome.trials
    assert len(table) == 4
    init, none = table[table.inject == "init"], table[table.inject == "none"]
    assert (init.status == "errored").all() and init.error.str.contains("became nan|became inf").all()
    assert (none.status == "completed").all()
    # Never retried, never a traceback: each diverged trial started once, and Tune printed no error.
    starts = [e["trial"] for e in journal_events(tmp_path / "runs" / "nan") if e["kind"] == "trial_start"]
    assert sorted(starts) == sorted(table.trial_id), starts
    printed = capfd.readouterr()
    assert "Traceback" not in printed.out + printed.err
    # Had every trial diverged, the confirm stage says that no trial produced a score, and the errors' reasons.
    from study.records.trial_tables import NoScoredTrial, confirmed_trials

    with pytest.raises(NoScoredTrial, match=r"none of its 2 trials produced a score \(val_CIDEr-D\) to confirm: "
                                            r"2 errored; errors: .*training loss became"):
        confirmed_trials(spec, init)

    _, runs = _trial_runs(tmp_path, "nan")
    assert len(runs) == 4
    failed = runs[runs["tags.status"] == "errored"]
    assert len(failed) == 2 and (failed["status"] == "FAILED").all()
    assert failed["tags.error"].str.contains("training loss became").all()
    assert (runs[runs["tags.status"] == "completed"]["status"] == "FINISHED").all()


def _journal_results(folder: Path) -> int:
    return sum(1 for event in journal_events(folder) if event["kind"] == "trial_result")


def _kill_group(process: subprocess.Popen, what: str) -> None:
    """kill -9 of a process and every process of its group (the Ray it started), waiting until none is left."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended, and its Ray with it
        pass
    process.wait(timeout=60)
    wait_for(lambda: not process_group_members(process.pid), 60, f"end of every process of the killed {what}")


@pytest.fixture(scope="module")
def resumed_study(tmp_path_factory, small_shapes, small_prepared):
    """A study whose driver is killed (with its Ray) after 3 epoch results, then `study resume`d; its MLflow runs,
    checkpoints and leaderboard read right after; then resumed a second time, finished already."""
    from types import SimpleNamespace

    tmp = tmp_path_factory.mktemp("resumable")
    spec_path = study_spec(tmp, "resumable", small_shapes)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "study", "run", str(spec_path), "--no-report"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                              cwd=tmp)
    folder = tmp / "runs" / "resumable"
    try:
        wait_for(lambda: _journal_results(folder) >= 3, 240, "3 trial results in the journal", process=driver)
    finally:
        _kill_group(driver, "driver")  # the driver and the Ray it started, mid-study

    resume = [sys.executable, "-m", "study", "resume", "resumable", "--storage", str(tmp / "runs"), "--no-report"]
    resumed = subprocess.run(resume, capture_output=True, text=True, timeout=600, cwd=tmp, env=env)
    assert resumed.returncode == 0, (resumed.stdout[-3000:], resumed.stderr[-3000:])  # all below reads its study
    parents, runs = _trial_runs(tmp, "resumable")
    checkpoints = {trial_dir: len(list(trial_dir.glob("checkpoint_*")))
                   for trial_dir in (folder / "tune").glob("*-lstm-*")}
    board = subprocess.run([sys.executable, "-m", "study", "leaderboard", "resumable", "--storage", str(tmp / "runs"),
                            "--format", "csv"], capture_output=True, text=True, timeout=120, cwd=tmp)
    again = subprocess.run(resume, capture_output=True, text=True, timeout=300, cwd=tmp, env=env)
    _, runs_after = _trial_runs(tmp, "resumable")
    return SimpleNamespace(tmp=tmp, spec_path=spec_path, folder=folder, env=env, resumed=resumed, parents=parents,
                           runs=runs, checkpoints=checkpoints, board=board, again=again, runs_after=runs_after)


@pytest.mark.slow
def test_resume_of_a_killed_driver_runs_the_study_to_its_end(resumed_study):
    proc = resumed_study.resumed
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "search of study resumable finished" in proc.stdout and "ran to the end" in proc.stdout
    # One progress display (trials of the total, each method's best) and the per-epoch lines; none of the
    # libraries' chatter without --verbose (issue 21).
    console = proc.stdout + proc.stderr
    # Captured (no terminal), the display is one line per change: "search resumable: 2/4 trials done (best ...)".
    assert "search resumable:" in proc.stderr and "/4 trials done" in proc.stderr and "best val_CIDEr-D" in proc.stderr
    assert "epoch 3/3" in proc.stderr
    for chatter in ("Configuration for experiment", "View detailed results here", "tensorboard", "TensorBoard",
                    "Wrote the latest version", "Creating initial MLflow database tables",
                    "Started a local Ray instance", "Token authentication"):
        assert chatter not in console, chatter


@pytest.mark.slow
def test_a_resumed_study_holds_exactly_one_finished_mlflow_run_per_trial(resumed_study):
    parents, runs = resumed_study.parents, resumed_study.runs
    assert len(parents) == 1 and parents.iloc[0]["status"] == "FINISHED"
    assert len(runs) == 4, runs[["tags.mlflow.runName", "status"]]
    assert runs["tags.trial_id"].is_unique
    assert (runs["status"] == "FINISHED").all() and (runs["tags.status"] == "completed").all(), \
        runs[["tags.mlflow.runName", "status", "tags.status", *[c for c in ["tags.error"] if c in runs]]].to_string()
    assert (runs["metrics.system/epoch_seconds"] > 0).all() and "metrics.epoch" not in runs  # the epoch is the step


@pytest.mark.slow
def test_after_a_resume_finished_trials_keep_only_their_last_checkpoint_and_lost_trials_none(resumed_study):
    # Finished trials keep only their last checkpoint (running ones keep all, so a crash can always resume).
    # A folder of a trial lost with the killed driver's last snapshot (it started, no epoch ended) may remain,
    # without any checkpoint: its place was proposed again.
    known = set(resumed_study.runs["tags.trial_id"])
    for trial_dir, kept in resumed_study.checkpoints.items():
        assert kept == (1 if trial_dir.name.rsplit("-", 1)[-1] in known else 0), (trial_dir, kept)


@pytest.mark.slow
def test_the_leaderboard_of_a_resumed_study_lists_the_best_trial_of_each_method_fully_trained(resumed_study):
    import io

    import pandas as pd

    board = resumed_study.board
    assert board.returncode == 0, board.stderr
    lines = board.stdout.strip().splitlines()
    assert lines[0].startswith("run,inject") and len(lines) == 3  # header + best of init + best of merge
    assert {line.split(",")[1] for line in lines[1:]} == {"init", "merge"}
    frame = pd.read_csv(io.StringIO(board.stdout))
    assert (frame["epochs"] == 3).all() and (frame["status"] == "completed").all()  # epochs actually trained


@pytest.mark.slow
def test_resuming_a_finished_study_is_harmless_and_duplicates_no_run(resumed_study):
    # Resuming a finished study is harmless: nothing is retrained, nothing duplicated.
    again = resumed_study.again
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(resumed_study.runs_after) == 4


@pytest.mark.slow
def test_study_json_of_a_study_on_the_default_store_names_no_tracking_uri(resumed_study):
    info = json.loads((resumed_study.folder / "study.json").read_text())
    assert info["tracking_uri"] is None  # the default store: the mlflow.db in the folder study.json is read from


@pytest.fixture(scope="module")
def interrupted_report(resumed_study):
    """`study report` of the resumed study killed (with its Ray) once its first confirm run is written, then run
    again to its end."""
    from types import SimpleNamespace

    tmp, folder, env = resumed_study.tmp, resumed_study.folder, resumed_study.env
    report_cmd = [sys.executable, "-m", "study", "report", "resumable", "--storage", str(tmp / "runs")]
    confirm = folder / "confirm"
    first = subprocess.Popen(report_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                             cwd=tmp, env=env)
    try:
        # A run is finished once its .json is there (written after its .pt, each by a rename).
        wait_for(lambda: list(confirm.glob("*.json")), 300, "finished confirm run", process=first)
        done_before = {p.name: p.stat().st_mtime_ns for p in confirm.glob("*.json")}
    finally:
        _kill_group(first, "report")
    second = subprocess.run(report_cmd, capture_output=True, text=True, timeout=600, cwd=tmp, env=env)
    return SimpleNamespace(folder=folder, confirm=confirm, done_before=done_before, second=second,
                           results={p.name: p for p in confirm.glob("*.json")})


@pytest.mark.slow
def test_an_interrupted_confirm_stage_reruns_only_the_runs_it_had_not_finished(interrupted_report):
    done_before, second, results = interrupted_report.done_before, interrupted_report.second, interrupted_report.results
    assert 1 <= len(done_before) < 4
    assert second.returncode == 0, (second.stdout[-3000:], second.stderr[-3000:])
    assert sorted(results) == ["init-r1-s0.json", "init-r1-s1.json", "merge-r1-s0.json", "merge-r1-s1.json"]
    for name, mtime in done_before.items():  # finished confirm runs were not trained again
        assert results[name].stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_confirm_retrains_the_best_trial_of_each_method_for_the_confirm_epochs_and_scores_each_image(
        resumed_study, interrupted_report):
    from study.spec import load_spec

    trials, _ = load_trial_tables(load_spec(resumed_study.spec_path))
    best_init = trials[trials.inject == "init"].sort_values("val_CIDEr-D").iloc[-1]
    retrained = json.loads(interrupted_report.results["init-r1-s0.json"].read_text())
    assert retrained["config"]["lr"] == pytest.approx(best_init["lr"]) and retrained["config"]["epochs"] == 2
    assert {"CIDEr-D", "BLEU-4", "METEOR", "ROUGE-L"} <= set(retrained["per_image"])


@pytest.mark.slow
def test_the_report_is_written_with_a_verdict_also_tagged_on_the_study_run(resumed_study, interrupted_report):
    from study.records.paths import sqlite_uri
    from study.tracking.mlflow_store import get_run_tags

    folder = interrupted_report.folder
    report = folder / "report" / "report.md"
    assert f"report: {report}" in interrupted_report.second.stdout and report.is_file()
    text = report.read_text()
    assert "## Verdict" in text and "init" in text and "merge" in text and "methods.png" in text
    # The 2-epoch confirm curves judged from the runs' own history (mean of 2 seeds; the end: the last epoch).
    curves = {m: [json.loads(interrupted_report.results[f"{m}-r1-s{s}.json"].read_text())["history"]
                  for s in (0, 1)] for m in ("init", "merge")}
    for method, (a, b) in curves.items():
        mean = [(x["val_CIDEr-D"] + y["val_CIDEr-D"]) / 2 for x, y in zip(a, b)]
        gain = mean[1] - mean[0]
        row = (f"| {method} | 1 | 2 | 2 | {1 + mean.index(max(mean))} | {max(mean) * 100:.1f} | {mean[1] * 100:.1f} "
               f"| {gain * 100:+.1f} (last 1) | {'yes' if gain >= 0.005 else 'no'} |")
        assert row in text, (row, text[text.find("## Did training"):][:1500])
    parents, _ = _trial_runs(resumed_study.tmp, "resumable")
    tags = get_run_tags(sqlite_uri(folder / "mlflow.db"), parents.iloc[0]["run_id"])
    assert tags["verdict"] in {"competes", "does not compete", "inconclusive"}


@pytest.mark.slow
def test_each_confirm_run_is_logged_once_with_its_checkpoint_however_often_the_stage_started(interrupted_report):
    from study.records.paths import sqlite_uri
    from study.tracking.mlflow_store import confirm_runs

    folder, results = interrupted_report.folder, interrupted_report.results
    # One child run per confirm run, each with its checkpoint, however often the confirm stage was started.
    logged = confirm_runs(sqlite_uri(folder / "mlflow.db"), "resumable")
    expected = [f"confirm-{name.removesuffix('.json')}" for name in sorted(results)]
    assert sorted(logged["tags.mlflow.runName"]) == expected
    assert all((interrupted_report.confirm / name.replace(".json", ".pt")).is_file() for name in results)


@pytest.mark.slow
def test_a_copied_study_folder_acts_on_itself_never_on_the_original(resumed_study, interrupted_report):
    """`cp -a runs/A runs_j/B; study report runs_j/B` rewrote A's report, and `study resume runs_j/B` rewrote A's
    study.json and could not restore Tune's callback (it held A's path). A study folder is self-contained."""
    import shutil

    original = interrupted_report.folder
    before = {p.relative_to(original): p.read_bytes() for p in original.rglob("*")
              if p.is_file() and p.suffix in (".json", ".md", ".yaml", ".csv")}
    copy = resumed_study.tmp / "copies" / "renamed"
    shutil.copytree(original, copy, symlinks=True)
    env = resumed_study.env
    report = subprocess.run([sys.executable, "-m", "study", "report", str(copy)], capture_output=True, text=True,
                            timeout=600, cwd=resumed_study.tmp, env=env)
    assert report.returncode == 0, report.stderr[-3000:]
    resume = subprocess.run([sys.executable, "-m", "study", "resume", "renamed", "--storage", str(copy.parent),
                             "--no-report"], capture_output=True, text=True, timeout=600, cwd=resumed_study.tmp,
                            env=env)
    assert resume.returncode == 0, (resume.stdout[-3000:], resume.stderr[-3000:])
    after = {p.relative_to(original): p.read_bytes() for p in original.rglob("*")
             if p.is_file() and p.suffix in (".json", ".md", ".yaml", ".csv")}
    assert after == before  # nothing of the original was written
    record = json.loads((copy / "study.json").read_text())
    assert record["name"] == "renamed" and record["storage"] == str(copy.parent) and record["tracking_uri"] is None
    assert f"report: {copy / 'report' / 'report.md'}" in report.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:  # refused while the server starts (HTTPError and timeouts are OSErrors too)
        return False


@pytest.mark.slow
def test_dead_tracking_server_does_not_kill_the_study_and_sync_logs_everything_later(tmp_path, small_shapes,
                                                                                     small_prepared):
    from study import tuning
    from study.spec import load_spec
    from study.tracking.mlflow_store import study_runs

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"  # nothing listens here yet: the server is "down"
    spec_path = study_spec(tmp_path, "offline", small_shapes, methods=["init", "none"], search={"trials": 2, "seed": 0},
                           asha={"max_epochs": 1, "grace_period": 1}, tracking={"uri": uri})
    spec = load_spec(spec_path)
    try:
        with pytest.warns(RuntimeWarning, match="not reachable.*study sync"):
            outcome = tuning.run_study(StudyContext.from_spec(spec, spec_path), progress=False, verbose=0)
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
        wait_for(lambda: _answers(f"{uri}/health"), 90, f"answer from the MLflow server at {uri}", process=server)
        synced = subprocess.run([sys.executable, "-m", "study", "sync", "offline", "--storage", str(tmp_path / "runs")],
                                capture_output=True, text=True, timeout=120)
        assert synced.returncode == 0, synced.stderr[-2000:]
        assert "sent" in synced.stdout
        parents, runs = study_runs(uri, "offline")
        assert len(parents) == 1 and parents.iloc[0]["status"] == "FINISHED"
        assert len(runs) == 2 and (runs["status"] == "FINISHED").all()
        assert runs["metrics.val_CIDEr-D"].notna().all()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
