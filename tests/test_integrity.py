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
from study.spec import load_spec

SPEC = """
name: t
dataset: {kind: shapes, images: 60}
fixed: {cell: lstm}
space:
  inject: {choice: [init, attention]}
  lr: {loguniform: [1.0e-3, 1.0e-2]}
  attention_dim: {choice: [32, 64], when: {inject: attention}}
stratify: inject
search: {trials: 4}
asha: {max_epochs: 3, grace_period: 1}
"""


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
    (SPEC.replace("when: {inject: attention}", "when: {lr: 0.5}"), ["when.lr", "outside the range"]),
])
def test_metric_mode_and_when_values_are_checked_when_the_spec_loads(tmp_path, text, needles):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_spec(path)
    message = str(err.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_a_condition_on_a_later_parameter_is_refused_since_it_could_never_hold(tmp_path):
    # Optuna samples space in file order: a `when` naming a parameter listed after it never sees its value.
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.replace("""  inject: {choice: [init, attention]}
  lr: {loguniform: [1.0e-3, 1.0e-2]}
  attention_dim: {choice: [32, 64], when: {inject: attention}}""", """  attention_dim: {choice: [32, 64], when: {inject: attention}}
  inject: {choice: [init, attention]}
  lr: {loguniform: [1.0e-3, 1.0e-2]}"""))
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
