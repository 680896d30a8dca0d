"""Faults and bad inputs, round two (issue 33), the cases met through a whole study's commands: each a test that
fails without its fix. docs/guarantees-round2.md is the table of what happens now.

One tiny study is made once for the module (`reported`: two barely trained methods, reported and decided, whose
captions score 0 everywhere), first refused during data preparation and then run again from the fixed spec
(item 18); its export (`exported`) is edited for `study reproduce` (items 12, 13, 19), a copy of it is synced after
its MLflow store was deleted or its bookkeeping damaged (items 2, 16), and it is locked, exported and evaluated on
read-only mounts, on a set no caption scores on, and under Ctrl-C (items 10, 11, 9, 4, 20). Item 22 has its own
study, whose `init` trials diverge before their first result.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.helpers import process_group_members, shapes_dataset, study_in_process, study_spec, wait_for

pytestmark = pytest.mark.slow  # every test here reads a real study trained for it (about a minute, once)


_study = partial(study_in_process, columns=250)  # `study ARGS...` in process, a wide console


def _command(*args: object, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m study ARGS...` as a subprocess (its own logging and console, as a user runs it)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "study", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _flat(text: str) -> str:
    return " ".join(text.split())


def _sentence(result, *fragments: str) -> None:
    """Exit 2, every fragment in the error, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output[-3000:], result.exception)
    for fragment in fragments:
        assert _flat(fragment) in _flat(result.output), (fragment, result.output[-3000:])
    assert "Traceback" not in result.output


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@contextmanager
def read_only(folder: Path):
    """``folder`` as a read-only bind mount of itself (chmod does not stop root); skips where mounts are refused."""
    made = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot bind-mount {folder} (needs root): {made.stderr.strip()}")
    try:
        ro = subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True, text=True)
        if ro.returncode != 0:
            pytest.skip(f"cannot remount {folder} read-only: {ro.stderr.strip()}")
        probe = folder / ".probe"
        try:
            probe.touch()
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip(f"{folder} is still writable after a read-only remount")
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


# ----- the module's study -----------------------------------------------------------------------------------------
def _spec(folder: Path, small_shapes, min_count: int) -> Path:
    """Two barely trained methods (init, pre; lr 1e-6, 1 epoch) whose captions score 0 on every image; with margin
    10 the verdict is decided ("competes") at its first look. No `confirm.max_seeds`."""
    path = folder / "faults.yaml"
    path.write_text(yaml.safe_dump({
        "name": "faults",
        "dataset": shapes_dataset(small_shapes),
        "fixed": {"hidden": 8, "embed": 8, "min_count": min_count, "batch_size": 160, "lr": 1e-6, "max_len": 4,
                  "val_images": 5},
        "space": {"inject": {"choice": ["init", "pre"]}},
        "stratify": "inject",
        "search": {"trials": 2, "seed": 0},
        "asha": {"max_epochs": 1, "grace_period": 1},
        "storage": str(folder / "runs"),
        "confirm": {"seeds": 1, "epochs": 1, "beam_size": 1, "margin": 10.0},
    }, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def reported(tmp_path_factory, small_shapes):
    """The study, first run with a `min_count` no word reaches (refused while its data is prepared), then run
    again, search, confirm stage and report, from the fixed spec."""
    from types import SimpleNamespace

    tmp = tmp_path_factory.mktemp("faults")
    spec = _spec(tmp, small_shapes, min_count=100_000)
    refused = _command("run", spec, cwd=tmp)
    refused_record = (tmp / "runs" / "faults" / "study.json").is_file()
    spec = _spec(tmp, small_shapes, min_count=1)
    ran = _command("run", spec, cwd=tmp)
    return SimpleNamespace(tmp=tmp, spec=spec, folder=tmp / "runs" / "faults", refused=refused, ran=ran,
                           refused_record=refused_record)


@pytest.fixture(scope="module")
def study_folder(reported) -> Path:
    """The reported study's folder (the fixture fails here, once, if the study could not be made)."""
    assert reported.ran.returncode == 0, reported.ran.stdout[-3000:] + reported.ran.stderr[-3000:]
    return reported.folder


@pytest.fixture(scope="module")
def exported(study_folder, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("export") / "faults"
    result = _study("export", study_folder, dest)
    assert result.exit_code == 0, result.output[-3000:]
    return dest


# ----- item 18: a study refused during data preparation can be run again from the fixed spec --------------------
def test_a_study_refused_while_its_data_is_prepared_says_so_and_runs_again_from_the_fixed_spec(reported):
    refused, spec = reported.refused, reported.spec
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    said = _flat(refused.stderr)
    assert "min_count 100000: no word of the train split occurs that often" in said, refused.stderr[-3000:]
    assert _flat(f"the study has no trials yet: fix {spec} and run `study run {spec}` again") in said
    assert "Traceback" not in refused.stdout + refused.stderr
    assert reported.refused_record  # the refused run took the name (study.json) ...
    # ... yet `study run` of the fixed spec was not refused as "already exists": it ran, from the fixed spec.
    ran = reported.ran
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "already exists" not in ran.stdout + ran.stderr
    assert yaml.safe_load((reported.folder / "spec.yaml").read_text())["fixed"]["min_count"] == 1
    assert sorted(p.name for p in (reported.folder / "confirm").glob("*.json")) == ["init-r1-s0.json",
                                                                                    "pre-r1-s0.json"]


# ----- item 21: decide on a decided study, without --max-seeds ----------------------------------------------------
def test_decide_on_a_decided_study_without_max_seeds_says_it_is_decided(study_folder):
    confirm = sorted(p.name for p in (study_folder / "confirm").iterdir())
    result = _study("decide", study_folder)
    # It asked for --max-seeds (exit 2) before looking: the spec plans no extra seeds, but none are needed.
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    assert "is already decided at the fixed 95% level: competes" in _flat(result.output)
    assert "--max-seeds" not in result.output
    assert sorted(p.name for p in (study_folder / "confirm").iterdir()) == confirm
    assert not (study_folder / "decide.json").exists()


# ----- items 12, 13, 19: `study reproduce` of an edited export ---------------------------------------------------
def _edited_export(exported: Path, tmp_path: Path, **cells) -> Path:
    """A copy of the export whose init-r1-s0 row of confirm_runs.csv has ``cells`` instead."""
    export = tmp_path / "export"
    shutil.copytree(exported, export)
    runs = pd.read_csv(export / "confirm_runs.csv", dtype=object)
    for column, value in cells.items():
        runs.loc[runs["run"] == "init-r1-s0", column] = value
    runs.to_csv(export / "confirm_runs.csv", index=False)
    return export


@pytest.mark.parametrize("column, value", [("hidden", "abc"), ("inject", "bogus")])
def test_reproduce_of_an_edited_confirm_runs_row_names_the_file_the_run_and_the_field(exported, tmp_path, column,
                                                                                        value):
    export = _edited_export(exported, tmp_path, **{column: value})
    result = _study("reproduce", export, "init-r1-s0")
    _sentence(result, f"{export / 'confirm_runs.csv'} (run init-r1-s0): {column}:")
    assert "ValidationError" not in result.output and "pydantic" not in result.output


def test_reproduce_with_a_truncated_provenance_names_the_file(exported, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(exported, export)
    provenance = export / "provenance.json"
    provenance.write_text(provenance.read_text()[:40])
    result = _study("reproduce", export, "init-r1-s0")
    _sentence(result, f"{provenance} is not valid JSON")
    assert "JSONDecodeError" not in result.output


def test_reproduce_of_an_edited_config_is_refused_before_training_naming_the_field(exported, tmp_path, monkeypatch):
    import study.trial.training

    def no_training(*args, **kwargs):
        raise AssertionError("study reproduce trained a configuration the run never trained")

    monkeypatch.setattr(study.trial.training, "run_trial", no_training)
    export = _edited_export(exported, tmp_path, hidden="16")  # the run trained hidden 8, as the spec fixes
    result = _study("reproduce", export, "init-r1-s0")
    _sentence(result, f"{export / 'confirm_runs.csv'}: run init-r1-s0's configuration is not the one it trained",
              "fields that differ: hidden=16 (the spec fixes 8)")
    recorded = int(pd.read_csv(exported / "confirm_runs.csv").set_index("run").loc["init-r1-s0", "params"])
    assert f"the run recorded {recorded}" in _flat(result.output)
    # The export as written reproduces up to that check (it passes): the refusal is the edit's.
    from study.stages.reproduce import _check_recorded_size, run_config

    cfg, *_ = run_config(exported, "init-r1-s0")
    from study.data.prepare import TokenSetting, prepare

    _check_recorded_size(exported, "init-r1-s0", cfg, prepare(cfg.dataset, [TokenSetting.of(cfg)], progress=False))


# ----- items 2 and 16: `study sync` of a lost store or damaged bookkeeping ---------------------------------------
def _copy(study_folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "elsewhere" / study_folder.name
    shutil.copytree(study_folder, copy)
    return copy


def _mlflow_runs(folder: Path) -> tuple[int, list[str]]:
    """(parent runs, the trial and confirm runs' names) in a study folder's own MLflow store."""
    from study.records.paths import sqlite_uri
    from study.tracking.mlflow_store import confirm_runs, study_runs

    uri = sqlite_uri(folder / "mlflow.db")
    parent, trials = study_runs(uri, "faults")
    confirms = confirm_runs(uri, "faults")
    return len(parent), sorted(trials["tags.mlflow.runName"]) + sorted(confirms["tags.mlflow.runName"])


def test_sync_after_the_mlflow_store_was_deleted_rebuilds_it_from_the_journal(study_folder, tmp_path):
    copy = _copy(study_folder, tmp_path)
    expected = _mlflow_runs(copy)
    assert expected[0] == 1 and len(expected[1]) == 4  # 2 trials, 2 confirm runs
    (copy / "mlflow.db").unlink()
    shutil.rmtree(copy / "mlartifacts", ignore_errors=True)
    synced = _command("sync", copy, cwd=tmp_path)
    assert synced.returncode == 0, synced.stderr[-3000:]
    # It said "sent 0 journalled events" and made no store; now it is rebuilt with every run, as `report` does.
    assert (copy / "mlflow.db").is_file(), synced.stdout + synced.stderr
    assert _mlflow_runs(copy) == expected
    assert "Traceback" not in synced.stdout + synced.stderr


@pytest.mark.parametrize("damaged, text", [("tracking_sent.json", '{"sent": 1'),  # torn by hand
                                           ("mlflow_runs.json", "[1, 2]")])  # not a map of runs
def test_sync_with_a_damaged_bookkeeping_file_warns_naming_it_and_duplicates_no_run(study_folder, tmp_path, damaged,
                                                                                   text):
    copy = _copy(study_folder, tmp_path)
    expected = _mlflow_runs(copy)
    events = len((copy / "tracking_journal.jsonl").read_text().splitlines())
    runs_before = json.loads((copy / "mlflow_runs.json").read_text())
    (copy / damaged).write_text(text)
    if damaged == "mlflow_runs.json":  # and events to send (a store rebuilt elsewhere: nothing marked sent)
        (copy / "tracking_sent.json").unlink()
    synced = _command("sync", copy, cwd=tmp_path)
    said = _flat(synced.stdout + synced.stderr)
    # It was JSONDecodeError's traceback.
    assert synced.returncode == 0, said[-3000:]
    assert "Traceback" not in said and "JSONDecodeError" not in said
    assert f"{copy / damaged} is damaged" in said
    # Every event was sent again and each run found again by its tags: not one run twice, the map whole again.
    assert _mlflow_runs(copy) == expected
    assert json.loads((copy / "tracking_sent.json").read_text())["sent"] == events
    assert json.loads((copy / "mlflow_runs.json").read_text()) == runs_before


# ----- items 10 and 11: read-only storage ----------------------------------------------------------------------
def test_locking_commands_on_a_read_only_study_are_one_sentence_naming_the_lock(study_folder):
    before = _files(study_folder)
    lock = study_folder / "driver.lock"
    with read_only(study_folder):
        results = {verb: _study(verb, study_folder) for verb in ("report", "sync", "decide")}
    for verb, result in results.items():
        _sentence(result, f"cannot write the study's lock {lock}: Read-only file system; `{verb}` writes into the "
                          "study folder")
    assert _files(study_folder) == before


def test_export_to_a_read_only_destination_is_one_sentence_naming_it(study_folder, tmp_path):
    dest = tmp_path / "shelf"
    dest.mkdir()
    with read_only(dest):
        into = _study("export", study_folder, dest)
        below = _study("export", study_folder, dest / "faults")
    _sentence(into, f"cannot write the export to {dest}: Read-only file system")
    _sentence(below, f"cannot write the export to {dest / 'faults'}: Read-only file system")
    assert list(dest.iterdir()) == []


# ----- item 9 and item 4's command: `study evaluate` on a set nothing scores on, and under Ctrl-C -----------------
@pytest.fixture(scope="module")
def unscorable(small_shapes, tmp_path_factory) -> tuple[Path, Path]:
    """(a Karpathy JSON of the study's own 20 test images whose references share no word with the models'
    vocabulary, its images root): every caption scores 0 there."""
    from study.data.shapes import ensure_shapes

    source = ensure_shapes(small_shapes, progress=False)
    data = json.loads(source.read_text())
    images = [entry for entry in data["images"] if entry["split"] == "test"]
    for entry in images:
        entry["sentences"] = [{"raw": f"zorbl quix vemp {i}"} for i in range(5)]
    path = tmp_path_factory.mktemp("oov") / "oov.json"
    path.write_text(json.dumps({"dataset": "oov", "images": images}))
    return path, source.parent / "images"


def test_evaluate_on_a_set_where_every_caption_scores_zero_decides_nothing(study_folder, unscorable):
    from study.study import Study

    dataset, images = unscorable
    result = _study("evaluate", study_folder, dataset, "--images-root", images, "--no-report")
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    found = Study.open(study_folder)
    scores = found.evaluations()
    per_image = [json.loads(p.read_text())["per_image"]["CIDEr-D"]
                 for p in (study_folder / "evaluate" / "oov" / "runs").glob("*.json")]
    assert len(per_image) == 2 and all(v == 0 for run in per_image for v in run.values()), scores
    # It printed "verdict on oov: competes ... 0.0 [0.0, 0.0]", a decision from nothing.
    said = _flat(result.output)
    assert "verdict on oov: not available" in said and "competes" not in said.split("verdict on oov:")[1]
    assert "so it cannot decide anything" in said
    assert found.evaluation_verdict("oov").attrs["verdict"] == "not available"


def test_ctrl_c_during_evaluate_exits_130_naming_the_command_that_continues(study_folder, unscorable, tmp_path):
    dataset, images = unscorable
    elsewhere = tmp_path / "elsewhere"  # not the study's ./runs: the hint must name its folder (item 20)
    elsewhere.mkdir()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "250", "PYTHONUNBUFFERED": "1"}
    command = ["evaluate", str(study_folder), str(dataset), "--images-root", str(images), "--name", "ctrlc",
               "--no-report"]
    # Ctrl-C's SIGINT as at a terminal: a suite started in the background by a script (`(make test &)`) passes
    # SIGINT on ignored, and Python then never raises KeyboardInterrupt.
    driver = subprocess.Popen([sys.executable, "-m", "study", *command], cwd=elsewhere, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    runs = study_folder / "evaluate" / "ctrlc" / "runs"
    try:
        wait_for(lambda: list(runs.glob("*-r1-s0.json")), 600, "the first evaluated run", process=driver,
                 interval=0.1)
        os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C at a terminal: the whole foreground group
        output, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
            pytest.fail("study evaluate did not end within 120 s of Ctrl-C")
    assert driver.returncode == 130, output[-3000:]
    said = _flat(output)
    hint = f"study evaluate {study_folder} {dataset} --name ctrlc"
    assert "evaluation interrupted. Finished runs are kept; continue with:" in said and hint in said, output[-3000:]
    assert "Traceback" not in output and "Aborted" not in output
    wait_for(lambda: not process_group_members(driver.pid), 30, "the end of every process of evaluate (METEOR's JVM)")
    assert len(list(runs.glob("*.json"))) == 1
    # The command it printed continues: the finished run is reused, the other scored.
    hinted = re.search(r"continue with:\s+study (.*)$", output.strip(), re.S).group(1).split()
    again = _study(*hinted, "--images-root", images, "--no-report")
    assert again.exit_code == 0, again.output[-3000:]
    assert "1 runs scored, 1 finished ones reused" in _flat(again.output)


# ----- item 22: an errored trial is not announced as completed -----------------------------------------------------
def test_a_trial_that_diverges_before_its_first_result_is_announced_errored_not_completed(tmp_path,
                                                                                         feature_cache_dir):
    import numpy as np

    from study.config import ShapesDataset
    from study.data.prepare import TokenSetting, prepare

    # Its own tiny dataset, whose cached features are poisoned: `init` reads them (loss inf at its first step, so
    # it ends before it reports anything); `none` never does.
    shapes = ShapesDataset(images=40, image_size=48, seed=12, cache_dir=feature_cache_dir)
    prepared = prepare(shapes, [TokenSetting("word", 20, 1)], need_grid=False, progress=False)
    pooled = np.load(Path(prepared.info["feature_cache"]) / "pooled.npy", mmap_mode="r+")
    pooled[:] = np.inf
    pooled.flush()
    del pooled
    fixed = {"cell": "lstm", "hidden": 8, "embed": 8, "min_count": 1, "batch_size": 40, "val_images": 4}
    spec = study_spec(tmp_path, "announced", shapes, methods=["init", "none"], fixed=fixed,
                      search={"trials": 2, "seed": 1}, asha={"max_epochs": 1, "grace_period": 1})
    ran = _command("run", spec, "--no-report", cwd=tmp_path)
    printed = ran.stdout + ran.stderr
    assert ran.returncode == 0, printed[-3000:]
    # Tune printed "Trial init-...-<id> completed. Last result:" for the trial that errored.
    assert not re.search(r"Trial \S+ completed", printed), printed[-3000:]
    errored = [line for line in printed.splitlines() if "ERRORED:" in line]
    assert len(errored) == 1 and "init" in errored[0] and re.search(r"training loss became (inf|nan)", errored[0])
    assert "1 ran to the end, 1 errored" in _flat(ran.stdout) or "1 errored, 1 ran to the end" in _flat(ran.stdout)


# ----- item 20: the hints of a study outside ./runs name its folder -------------------------------------------------
def test_hints_for_a_study_outside_runs_name_its_folder(study_folder, unscorable, tmp_path):
    copy = _copy(study_folder, tmp_path)  # in tmp_path/elsewhere, while the command runs in the repository
    (copy / "report" / "report.md").unlink()
    unreported = _study("export", copy, tmp_path / "dest")
    # "run `study report faults` first" failed with "no study 'faults'".
    _sentence(unreported, f"run `study report {copy}` first")
    shutil.rmtree(copy / "confirm")
    unconfirmed = _study("evaluate", copy, unscorable[0], "--images-root", unscorable[1])
    _sentence(unconfirmed, f"`study report {copy}` trains them first")


# ----- issue 30: the records are typed, so a damaged one is named, and the confirm stage trains it again ----------
def test_a_damaged_confirm_result_is_named_by_export_and_trained_again_by_report(study_folder, tmp_path):
    copy = _copy(study_folder, tmp_path)
    damaged = copy / "confirm" / "init-r1-s0.json"
    original = json.loads(damaged.read_text())
    damaged.write_text(damaged.read_text()[: len(damaged.read_text()) // 2])  # torn, as by a full disk
    refused = _command("export", copy, tmp_path / "export", cwd=tmp_path)
    said = _flat(refused.stdout + refused.stderr)
    # It was JSONDecodeError's traceback, naming no file.
    assert refused.returncode == 2 and "Traceback" not in said, said[-3000:]
    assert f"{damaged} is not a readable ConfirmResult" in said and "`study confirm` trains that run again" in said
    reported = _command("report", copy, cwd=tmp_path)
    said = _flat(reported.stdout + reported.stderr)
    assert reported.returncode == 0, said[-3000:]
    assert f"confirm run init-r1-s0 was damaged ({damaged} is not a readable ConfirmResult" in said
    assert (copy / "confirm" / "stale" / damaged.name).is_file()  # kept aside, not deleted
    retrained = json.loads(damaged.read_text())
    # The same seed retrains the same model: the damaged run's captions and scores come back.
    assert retrained["captions"] == original["captions"]
    assert retrained["scores"]["CIDEr-D"] == original["scores"]["CIDEr-D"]
