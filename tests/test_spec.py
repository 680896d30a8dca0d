"""Search-space specs: every mistake fails before Ray starts, naming the file, the key and what is allowed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from study.config import ConfigError
from study.spec import load_spec
from tests.helpers import GOOD_SPEC as GOOD  # a small valid spec

REPO = Path(__file__).resolve().parents[1]



def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_good_spec_loads_with_defaults(tmp_path):
    spec = load_spec(_write(tmp_path, GOOD))
    assert spec.methods == ["init", "attention"] and spec.trials_per_method == 2
    assert spec.metric == "val_CIDEr-D" and spec.mode == "max" and spec.search.algorithm == "optuna"
    cfg = spec.trial_config({"inject": "init", "lr": 0.004})
    assert cfg.epochs == 3 and cfg.cell == "lstm" and cfg.run_name == "init-lstm-1x256-word"
    assert Path(spec.storage).is_absolute()


def assert_spec_refused(path, needles) -> None:
    """Loading ``path`` is a ConfigError whose message names the file and every needle."""
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    message = str(err.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize("text, needles", [
    ("name: t\nspace: {inject: {choice: [init]}\n", ["not valid YAML", "line"]),
    (GOOD + "asha_typo: 1\n", ["asha_typo: unknown key"]),
    (GOOD.replace("grace_period: 1", "grace: 1"), ["asha.grace: unknown key"]),
    (GOOD.replace("trials: 4", "trials: many"), ["search.trials", "integer"]),
    (GOOD.replace("[1.0e-3, 1.0e-2]", "[0.0, 1.0e-2]"), ["space.lr", "loguniform: low must be positive"]),
    (GOOD.replace("cell: lstm", "cells: lstm"), ["unknown trial parameter", "cells", "allowed"]),
    (GOOD.replace("[init, attention]", "[init, nonsense]"), ["nonsense", "inject"]),
    (GOOD.replace("grace_period: 1", "grace_period: 9"), ["grace_period (9) exceeds max_epochs (3)"]),
    (GOOD.replace("kind: shapes, images: 60", "kind: karpathy, json: /no/such/file.json"),
     ["dataset", "/no/such/file.json does not exist"]),
    (GOOD.replace("kind: shapes", "kind: coco"), ["dataset", "coco", "shapes", "karpathy"]),
    (GOOD.replace("when: {inject: attention}", "when: {injection: attention}"), ["injection", "neither searched"]),
    # Issue 22: every range end, the confirm settings, the encoder and the seeds are checked at load.
    (GOOD.replace("[1.0e-3, 1.0e-2]", "[0.5, 5.0]"), ["space.lr: loguniform high end 5.0", "less than 1"]),
    (GOOD + "confirm: {epochs: 5000}\n", ["confirm: epochs", "less than or equal to 1000"]),
    (GOOD + "confirm: {beam_size: 50}\n", ["confirm: beam_size", "less than or equal to 20"]),
    (GOOD.replace("images: 60", "images: 60, encoder: resnet9000"), ["unknown encoder 'resnet9000'",
                                                                        "efficientnet_lite0"]),
    (GOOD.replace("trials: 4", f"trials: 4, seed: {2**70}"), ["search.seed", "less than or equal to 2147483647"]),
    (GOOD.replace("cell: lstm", f"cell: lstm, seed: {2**70}"), ["fixed", "seed", "less than or equal"]),
    (GOOD.replace("[init, attention]", "[init, init, attention]"), ["['init'] more than once"]),
    (GOOD.replace("cell: lstm", "cell: lstm, epochs: 7"), ["epochs is not a fixed parameter of a study",
                                                          "asha.max_epochs", "confirm.epochs"]),
    (GOOD.replace("when: {inject: attention}", "when: {lr: 0.005}"), ["lr is drawn from a continuous range",
                                                                     "never equals"]),
])
def test_bad_specs_name_the_file_and_the_key(tmp_path, text, needles):
    path = _write(tmp_path, text)
    assert_spec_refused(path, needles)


def test_unknown_injection_method_lists_the_valid_ones(tmp_path):
    from study.config import TrialConfig
    from study.models import build_captioner

    with pytest.raises((KeyError, ValueError)) as err:
        build_captioner(TrialConfig(inject="memory"), 20, 16)
    for name in ("init", "pre", "par", "merge", "attention", "none"):
        assert name in str(err.value)


def test_shipped_spaces_validate():
    for path in sorted((REPO / "search_spaces").glob("*.yaml")):
        spec = load_spec(path, check_paths=False)
        assert spec.stratified and "init" in spec.methods, path
        # Every study of the question gives init and the four methods it is compared with the same budget
        # (flickr8k_fair leaves out the image-blind floor, none, to fit one session); the tokens study
        # compares char and word decoding for init and par only. Studies with arms carry the seed's own model
        # (the image in c0 of the first LSTM layer alone) as their target arm.
        compared = {"init", "pre", "par", "merge", "attention"}
        assert compared <= set(spec.methods) or path.stem == "flickr8k_tokens", path
        if spec.arms:
            seed = spec.arm_set.arms[spec.arm_set.target]
            assert "c0 of the first LSTM layer only" in spec.arm_set.describe(seed.name), path


def test_validating_a_spec_imports_neither_torch_nor_the_models(tmp_path):
    # A fresh interpreter: this test process has imported torch already. The names of methods and cells come
    # from the leaf study.registry, so config validation needs no model code (and config <-> models is no cycle).
    path = _write(tmp_path, GOOD)
    code = ("import sys; import study.spec; "
            f"spec = study.spec.load_spec({str(path)!r}); "
            "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith('study.models')); "
            "print(spec.methods, heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['init', 'attention'] []"


def test_cli_rejects_bad_spec_before_starting_ray_and_dry_run_prints_budget(tmp_path):
    bad = _write(tmp_path, GOOD + "extra: 1\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "study", "run", str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "extra: unknown key" in proc.stderr
    assert "ray" not in proc.stderr.lower() and time.perf_counter() - t0 < 30

    good = _write(tmp_path, GOOD)
    proc = subprocess.run([sys.executable, "-m", "study", "run", str(good), "--dry-run"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "4 trials" in proc.stdout and "up to 2 trials each" in proc.stdout
    assert "    init: inject init" in proc.stdout and "    attention: inject attention" in proc.stdout
    assert "attention_dim" in proc.stdout and "inject = attention" in proc.stdout


def test_a_spec_error_names_the_line_suggests_the_name_and_carries_no_pydantic_prefix(tmp_path):
    """Issue 34 item 7: "<top level>: Value error, space: unknown trial parameter(s) ['dropuot']; allowed: [...]",
    and YAML syntax errors `in "<unicode string>"`."""
    typo = _write(tmp_path, GOOD.replace("  lr: {loguniform", "  dropuot: {uniform: [0.0, 0.5]}\n  lr: {loguniform"))
    with pytest.raises(ConfigError) as err:
        load_spec(typo)
    line = typo.read_text().splitlines().index("  dropuot: {uniform: [0.0, 0.5]}") + 1
    message = str(err.value)
    assert message.startswith(f"{typo}:{line}: space.dropuot: unknown trial parameter (did you mean `dropout`?);")
    assert "Value error" not in message and "<top level>" not in message and "['" not in message
    # unknown keys of the spec's own models, nested and in the dataset's union: each with its line and a suggestion
    keys = _write(tmp_path, GOOD.replace("search: {trials: 4}", "search:\n  trails: 4").replace(
        "images: 60}", "imagse: 60}").replace("when: {inject", "whne: {inject"))
    with pytest.raises(ConfigError) as err:
        load_spec(keys)
    lines = str(err.value).splitlines()
    text = keys.read_text().splitlines()
    assert lines[0] == f"{keys}: 3 problems"
    expected = {"dataset.shapes.imagse": ("dataset:", "images"),
                "space.attention_dim.whne": ("  attention_dim", "when"), "search.trails": ("  trails", "trials")}
    for key, (starts, suggestion) in expected.items():
        row = next(r for r in lines if f": {key}: " in r)
        number = next(i for i, t in enumerate(text, 1) if t.startswith(starts))
        assert row.strip().startswith(f"{keys}:{number}: {key}: unknown key (did you mean `{suggestion}`?)"), row
    # a value error inside a key keeps its path and line, without "Value error, "
    bad_range = _write(tmp_path, GOOD.replace("loguniform: [1.0e-3, 1.0e-2]", "loguniform: [1.0e-2, 1.0e-3]"))
    with pytest.raises(ConfigError) as err:
        load_spec(bad_range)
    number = next(i for i, t in enumerate(bad_range.read_text().splitlines(), 1) if t.startswith("  lr:"))
    assert str(err.value).startswith(f"{bad_range}:{number}: space.lr: loguniform: low must be below high")
    # YAML syntax: the file, not "<unicode string>"
    broken = _write(tmp_path, "name: t\nfixed: {cell: lstm\n")
    with pytest.raises(ConfigError) as err:
        load_spec(broken)
    assert "<unicode string>" not in str(err.value) and f'in "{broken}", line 2' in str(err.value)


@pytest.mark.parametrize("confirm, margin", [("{}", 0.02), ("{margin_points: 5}", 0.05), ("{margin: 0.03}", 0.03)])
def test_the_margin_is_written_in_points_and_an_older_specs_0_to_1_margin_still_reads_as_it_did(tmp_path, confirm,
                                                                                                margin):
    """Issue 34 item 2: the spec's margin is in points, like every score a person reads (``margin_points: 5``); a
    study's stored spec from before points says ``margin: 0.03`` on the 0..1 scale and judges as it did."""
    spec = load_spec(_write(tmp_path, GOOD + f"confirm: {confirm}\n"))
    assert spec.confirm.equivalence_margin == pytest.approx(margin, rel=1e-12)


def test_a_spec_giving_the_margin_on_both_scales_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="margin .the 0..1 scale. and margin_points both given"):
        load_spec(_write(tmp_path, GOOD + "confirm: {margin: 0.02, margin_points: 2}\n"))


def _points(points: str) -> str:
    return GOOD.replace("search: {trials: 4}", f"search: {{trials: 4, points_to_evaluate: [{points}]}}")


# ----- spec mistakes found before Ray starts (issue 11, item 5) -------------------------------------------------------
@pytest.mark.parametrize("text, needles", [
    (GOOD + "metric: val_cider\n", ["metric", "val_cider", "val_CIDEr-D", "val_loss"]),
    (GOOD + "metric: epoch_seconds\n", ["metric", "epoch_seconds", "allowed"]),
    (GOOD + "metric: val_loss\nmode: max\n", ["mode", "val_loss", "mode: min"]),
    (GOOD + "mode: maxx\n", ["mode", "max", "min"]),
    (GOOD.replace("when: {inject: attention}", "when: {inject: attentoin}"),
     ["space.attention_dim.when.inject", "attentoin", "['init', 'attention']"]),
    (GOOD.replace("when: {inject: attention}", "when: {inject: [init, atention]}"),
     ["space.attention_dim.when.inject", "atention"]),
    (GOOD.replace("fixed: {cell: lstm}", "fixed: {cell: lstm, layers: 1}").replace(
        "when: {inject: attention}", "when: {layers: 2}"), ["when.layers", "fixed to 1"]),
    (GOOD.replace("when: {inject: attention}", "when: {lr: 0.5}"), ["when.lr", "drawn from a continuous range"]),
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
    path.write_text(GOOD.replace(in_order, condition_first))
    with pytest.raises(ConfigError, match="space.attention_dim.when.inject: 'inject' is searched after"):
        load_spec(path)


def test_dry_run_catches_a_bad_metric_and_a_misspelt_condition(tmp_path):
    for i, (text, needle) in enumerate([(GOOD + "metric: val_cider\n", "val_cider"),
                                        (GOOD.replace("when: {inject: attention}", "when: {inject: attentoin}"),
                                         "attentoin")]):
        path = tmp_path / f"spec{i}.yaml"
        path.write_text(text)
        proc = subprocess.run([sys.executable, "-m", "study", "run", str(path), "--dry-run"], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2, proc.stdout
        assert needle in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
