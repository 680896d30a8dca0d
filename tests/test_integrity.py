"""Study integrity (issue 11): one driver per study, no code run from storage, nothing retrained after a
crash, spec mistakes caught before Ray starts, a dead tracking server harmless, a local Ray on loopback only.

Every test drives the real thing: real specs, real Ray, a real MLflow sqlite store, real `shapes` data.
"""

from __future__ import annotations

import subprocess
import sys
import time
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


# ----- item 2: the searchers' state is data, never a pickle -------------------------------------------------
class _Exploit:
    """Unpickling this runs a shell command that leaves a marker file: what a crafted state file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _searcher_spec(tmp_path: Path):
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.replace("search: {trials: 4}", "search: {trials: 6, seed: 3}"))
    return load_spec(path)


def test_searcher_state_is_json_and_a_pickle_where_the_old_state_was_is_never_opened(tmp_path):
    import json
    import pickle

    from study.tuning import StudySearcher

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
    (folder / "searcher-state-2026-12-31_00-00-00.pkl").write_bytes(pickle.dumps(_Exploit(marker)))

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

