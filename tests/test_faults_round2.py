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
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from study.cli import app
from study.config import ConfigError, TrialConfig
from tests.conftest import REPO, process_group_members, shapes_dataset, study_spec

TINY = {"hidden": 16, "embed": 16, "dropout": 0.0, "min_count": 1, "batch_size": 40, "val_images": 10}


def _study(*args: object):
    """`study ARGS...` in process: exit_code, stdout, stderr, output."""
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})


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
    from study.training import TrialDidNotLearn, TrialDiverged, run_trial, unigram_entropy

    # lr 1e-9: the weights stay where they started, the loss flat at about log(vocabulary), no NaN (what
    # weight_decay 1e30 under Adam did: trials "completed" and the study decided a verdict from them).
    stuck = TrialConfig(dataset=small_shapes, **TINY, epochs=3, lr=1e-9)
    epochs = []
    with pytest.raises(TrialDidNotLearn, match=r"learned nothing: validation loss .* after epoch 2 .*lr=1e-09"):
        run_trial(stuck, small_prepared, work_dir=tmp_path / "stuck", progress=False,
                  on_epoch=lambda metrics, _: epochs.append(metrics))
    assert [m["epoch"] for m in epochs] == [1]
    assert issubclass(TrialDidNotLearn, TrialDiverged)  # ended as a divergence: errored, never retried or ranked
    # A model that learns is below the baseline by its second epoch.
    learns = run_trial(stuck.model_copy(update={"lr": 5e-3, "epochs": 2}), small_prepared,
                       work_dir=tmp_path / "learns", progress=False)
    from study.evaluation import SplitTensors

    tokens = small_prepared.tokens_for(stuck)
    baseline = unigram_entropy(SplitTensors.of(tokens.splits["train"], small_prepared.images["train"].rows))
    assert learns.epochs[-1]["val_loss"] < baseline < epochs[0]["val_loss"]


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
from study.metrics import _meteor, find_java

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
    from study.metrics import find_java

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
