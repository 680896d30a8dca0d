"""Faults and bad inputs, round two (issue 33): each case that broke, now a test that fails without its fix.

Real commands (typer's CliRunner in process, or `python -m study` as a subprocess), real files and real tiny
trainings on the session's small `shapes` data. The table of what happens now is docs/guarantees-round2.md.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import yaml

from study.config import ConfigError, TrialConfig
from tests.helpers import REPO, process_group_members, shapes_dataset, study_in_process, study_spec

TINY = {"hidden": 16, "embed": 16, "dropout": 0.0, "min_count": 1, "batch_size": 40, "val_images": 10}


_study = partial(study_in_process, columns=250)  # `study ARGS...` in process, a wide console


def _sentence(result, *fragments: str) -> None:
    """Exit 2, every fragment in the error, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output[-3000:], result.exception)
    flat = " ".join(result.output.split())
    for fragment in fragments:
        assert " ".join(fragment.split()) in flat, (fragment, result.output[-3000:])
    assert "Traceback" not in result.output


# ----- item 6: a key given twice ------------------------------------------------------------------------------
def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path, small_shapes):
    from study.spec import load_spec

    path = study_spec(tmp_path, "twice", small_shapes)
    lines = path.read_text().splitlines()
    search = next(i for i, line in enumerate(lines) if line.startswith("search:"))
    # A second `search:` block at the end: PyYAML kept the last one silently (a study ran 40 trials, not 2).
    path.write_text("\n".join(lines + ["search:", "  trials: 40", "  seed: 1"]) + "\n")
    with pytest.raises(ConfigError, match=rf"{path}: key 'search' is given twice, on line {search + 1} and on "
                                          rf"line {len(lines) + 1}"):
        load_spec(path)
    # Also inside a block (`inject:` twice in space:).
    nested = tmp_path / "nested.yaml"
    nested.write_text("space:\n  inject: {choice: [init]}\n  inject: {choice: [merge]}\n")
    with pytest.raises(ConfigError, match="key 'inject' is given twice, on line 2 and on line 3"):
        load_spec(nested)


# ----- item 7: points to evaluate of the wrong type ----------------------------------------------------------
@pytest.mark.parametrize("point, needle", [
    ({"inject": "init", "layers": 1.5}, "layers = 1.5 is not a whole number"),
    ({"inject": "init", "hidden": 40}, "hidden = 40 is not on the grid of space.hidden"),
])
def test_a_point_to_evaluate_its_distribution_cannot_take_is_refused_at_load(tmp_path, small_shapes, point, needle):
    from study.spec import load_spec

    space = {"inject": {"choice": ["init", "merge"]}, "layers": {"int": [1, 2]}, "hidden": {"quniform": [16, 64, 16]}}
    fixed = {"cell": "lstm", "embed": 16, "min_count": 1, "batch_size": 40, "val_images": 20}
    path = study_spec(tmp_path, "points", small_shapes, space=space, fixed=fixed,
                      search={"trials": 4, "seed": 1, "points_to_evaluate": [point]})
    with pytest.raises(ConfigError, match=needle):
        load_spec(path)
    ok = study_spec(tmp_path, "points-ok", small_shapes, space=space, fixed=fixed,
                    search={"trials": 4, "seed": 1, "points_to_evaluate": [{"inject": "init", "layers": 2,
                                                                            "hidden": 48}]})
    assert load_spec(ok).search.points_to_evaluate[0]["layers"] == 2


# ----- item 8: --max-concurrent 0 -----------------------------------------------------------------------------
def test_max_concurrent_below_one_is_refused(tmp_path, small_shapes):
    path = study_spec(tmp_path, "conc", small_shapes)
    for value in ("0", "-2"):
        result = _study("run", path, "--max-concurrent", value, "--dry-run")
        assert result.exit_code == 2 and "--max-concurrent" in result.output
        assert "greater than or equal to 1" in result.output


# ----- item 5: a trial that learns nothing ---------------------------------------------------------------------
def test_weight_decay_beyond_one_is_refused_naming_the_key(tmp_path, small_shapes):
    from study.spec import load_spec

    path = study_spec(tmp_path, "decay", small_shapes, fixed={"cell": "lstm", "hidden": 16, "min_count": 1,
                                                              "weight_decay": 1e30})
    with pytest.raises(ConfigError, match="weight_decay"):
        load_spec(path)


def test_a_trial_that_learns_nothing_ends_as_diverged_at_its_second_epoch(small_shapes, small_prepared, tmp_path):
    from study.trial.training import TrialDidNotLearn, TrialDiverged, run_trial, unigram_entropy

    # lr 1e-9: the weights stay where they started, the loss flat at about log(vocabulary), no NaN (what
    # weight_decay 1e30 under Adam did: trials "completed" and the study decided a verdict from them).
    stuck = TrialConfig(dataset=small_shapes, **TINY, epochs=3, lr=1e-9)
    epochs = []
    with pytest.raises(TrialDidNotLearn, match=r"learned nothing: validation loss .* after epoch 2 .*lr=1e-09"):
        run_trial(stuck, small_prepared, work_dir=tmp_path / "stuck", progress=False,
                  on_epoch=lambda metrics, _: epochs.append(metrics))
    assert [m["epoch"] for m in epochs] == [1]
    assert issubclass(TrialDidNotLearn, TrialDiverged)  # ended as a divergence: errored, never retried or ranked
    from study.trial.evaluation import SplitTensors

    tokens = small_prepared.tokens_for(stuck)
    baseline = unigram_entropy(SplitTensors.of(tokens.splits["train"], small_prepared.images["train"].rows))
    assert baseline < epochs[0]["val_loss"]
    # A model this small on this little data may still be above the baseline at epoch 2 while it learns: its
    # falling training loss keeps it going.
    learns = run_trial(stuck.model_copy(update={"lr": 5e-3, "epochs": 2}), small_prepared,
                       work_dir=tmp_path / "learns", progress=False)
    assert len(learns.epochs) == 2 and learns.epochs[1]["train_loss"] < 0.99 * learns.epochs[0]["train_loss"]


# ----- items 14, 15, 17: `study caption` and `study data shapes` ------------------------------------------------
@pytest.fixture(scope="module")
def trained(small_shapes, small_prepared, tmp_path_factory) -> Path:
    """A checkpoint of a 1-epoch tiny trial (study train)."""
    tmp = tmp_path_factory.mktemp("trained")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump({"dataset": shapes_dataset(small_shapes), **TINY, "epochs": 1}))
    result = _study("train", config, "--no-test", "--out", tmp / "model")
    assert result.exit_code == 0, result.output[-3000:]
    return tmp / "model" / "checkpoint.pt"


def _an_image(small_prepared) -> Path:
    return Path(small_prepared.images["test"].paths[0])


def test_caption_with_a_beam_below_one_is_refused(trained, small_prepared):
    for beam in ("0", "-3"):
        result = _study("caption", "--checkpoint", trained, "--beam-size", beam, _an_image(small_prepared))
        assert result.exit_code == 2 and "--beam-size" in result.output
        assert "greater than or equal to 1" in result.output
        assert "Traceback" not in result.output


def test_caption_with_a_checkpoint_whose_config_does_not_fit_its_weights_names_the_file(trained, small_prepared,
                                                                                         tmp_path):
    import torch

    state = torch.load(trained, weights_only=True)
    state["config"]["hidden"] = 32  # edited after training: the weights are 16 wide
    edited = tmp_path / "edited.pt"
    torch.save(state, edited)
    result = _study("caption", "--checkpoint", edited, _an_image(small_prepared))
    _sentence(result, f"{edited}: its weights do not fit the model its own config and vocabulary describe",
              "size mismatch")


def test_data_shapes_with_a_size_or_count_out_of_range_is_refused(tmp_path):
    for option, value in (("--image-size", "0"), ("--images", "-10"), ("--image-size", "4096")):
        result = _study("data", "shapes", "--out", tmp_path / "shapes", option, value)
        assert result.exit_code == 2 and option in result.output and "Traceback" not in result.output
    assert not (tmp_path / "shapes").exists()


# ----- item 4: Ctrl-C while METEOR scores -----------------------------------------------------------------------
METEOR_INTERRUPTED = """
import signal, sys, time
from study.trial.metrics import _meteor, find_java

def interrupt(signum, frame):
    raise KeyboardInterrupt
signal.signal(signal.SIGALRM, interrupt)
signal.alarm(3)  # METEOR's JVM takes ~11 s to load its tables: the interrupt lands inside compute_score
gts = {i: ["a red square above a blue circle"] * 5 for i in range(50)}
res = {i: ["a red square"] for i in range(50)}
try:
    _meteor(gts, res, find_java())
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_an_interrupt_while_meteor_scores_ends_its_jvm_and_returns():
    from study.trial.metrics import find_java

    if find_java() is None:
        pytest.skip("no Java for METEOR")
    started = time.monotonic()
    # pycocoevalcap's Meteor.__del__ waited for ever on the lock compute_score held: `study evaluate` never exited.
    child = subprocess.Popen([sys.executable, "-c", METEOR_INTERRUPTED], stdout=subprocess.PIPE, text=True,
                             cwd=REPO, start_new_session=True)
    try:
        out, _ = child.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        pytest.fail("an interrupt inside METEOR's scoring hung the process")
    assert child.returncode == 0 and out.strip() == "interrupted" and time.monotonic() - started < 30
    assert process_group_members(child.pid) == []  # the JVM is ended too


# ----- item 1: an interrupted study, copied or moved, resumes where it is now ----------------------------------
def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _run_study(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "study", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_an_interrupted_study_copied_or_moved_resumes_into_its_own_folder(tmp_path, small_shapes, small_prepared):
    import shutil

    from tests.helpers import wait_for

    fixed = {"cell": "lstm", "hidden": 16, "embed": 16, "min_count": 1, "batch_size": 40, "val_images": 10}
    spec = study_spec(tmp_path, "A", small_shapes, fixed=fixed, search={"trials": 4, "seed": 1},
                      asha={"max_epochs": 3, "grace_period": 3, "reduction_factor": 2})
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "study", "run", str(spec), "--max-concurrent", "2",
                               "--no-report"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    original = tmp_path / "runs" / "A"
    try:
        wait_for(lambda: list((original / "tune").glob("*/checkpoint_*")), 600, "a trial's first checkpoint",
                 process=driver)
        os.kill(driver.pid, signal.SIGTERM)  # the driver stops as Ctrl-C stops it: exit 143, resumable
        driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode == 143
    trials_before = {p.name for p in (original / "tune").iterdir() if p.is_dir()}
    before = _files(original)

    (tmp_path / "copies").mkdir()
    shutil.copytree(original, tmp_path / "copies" / "B", symlinks=True)
    copied = _run_study(["resume", str(tmp_path / "copies" / "B"), "--no-report"], cwd=tmp_path)
    assert copied.returncode == 0, copied.stdout[-3000:] + copied.stderr[-3000:]
    assert "errored" not in copied.stdout, copied.stdout[-3000:]
    # The copy's new trials wrote into the copy: the original is as the kill left it, file for file.
    assert _files(original) == before
    assert {p.name for p in (original / "tune").iterdir() if p.is_dir()} == trials_before
    trained = sorted((tmp_path / "copies" / "B" / "tune").glob("*/checkpoint_*/history.json"))
    assert len({p.parent.parent.name for p in trained}) == 4

    # Moved: its new trials could not set up their storage (the old path) and errored with four tracebacks.
    shutil.move(original, tmp_path / "moved" / "A")
    moved = _run_study(["resume", str(tmp_path / "moved" / "A"), "--no-report"], cwd=tmp_path)
    assert moved.returncode == 0, moved.stdout[-3000:] + moved.stderr[-3000:]
    assert "errored" not in moved.stdout and "Traceback" not in moved.stdout + moved.stderr, moved.stderr[-3000:]
    assert not original.exists()
    assert len(list((tmp_path / "moved" / "A" / "tune").glob("*/params.json"))) == 4


# ----- issue 30, item 4: `study` and `python -m study` are one entry point ----------------------------------------
def test_the_console_script_and_python_m_study_fail_on_a_bad_spec_alike(tmp_path, small_shapes):
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "study"]
    assert script.value == "study.cli:main"  # not study.cli:app, which skipped main()'s configure and handler
    spec = study_spec(tmp_path, "bad", small_shapes)
    spec.write_text(spec.read_text() + "search:\n  trials: 40\n")
    study = Path(sys.executable).parent / "study"
    if not study.is_file():
        pytest.skip(f"no console script beside {sys.executable}")
    env = {**os.environ, "COLUMNS": "250"}
    runs = [subprocess.run([*command, "run", str(spec), "--dry-run"], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=120)
            for command in ([str(study)], [sys.executable, "-m", "study"])]
    for run in runs:
        assert run.returncode == 2 and "error:" in run.stderr and "is given twice" in run.stderr, run.stderr[-2000:]
        assert "Traceback" not in run.stderr
    assert runs[0].stderr == runs[1].stderr and runs[0].stdout == runs[1].stdout


def test_importing_the_package_changes_no_process_setting():
    # Environment defaults, logger levels and typer's --help patch are made by study.configure.configure(), called
    # by the command's entry point (and by run_study / MlflowStore), never on import.
    keys = ["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "TUNE_DISABLE_STRICT_METRIC_CHECKING",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"]
    code = ("import os, logging; from typer.core import TyperOption; "
            "shown = TyperOption.display_type_rich; "
            "import study.cli.app, study.console, study.tuning.runner, study.tracking.mlflow_store; "
            f"assert not [k for k in {keys!r} if k in os.environ]; "
            "assert TyperOption.display_type_rich is shown; "
            "assert logging.getLogger('mlflow.store.db.utils').level == logging.NOTSET; "
            "from study.configure import configure; configure(); "
            "assert os.environ['TUNE_DISABLE_STRICT_METRIC_CHECKING'] == '1'; "
            "assert TyperOption.display_type_rich is not shown")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNE_", "MLFLOW_"))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
