"""Arms: the named parts of the space a study compares. A spec's arms are checked when it loads (outside the space,
overlapping, a missing target: refused naming the arm), every configuration lies in one arm, each arm gets its own
searcher and the same search compute in trial-epochs, and a run keeps its best validation epoch's model."""

from __future__ import annotations

import pickle
from pathlib import Path

import optuna
import pytest

from study.config import ConfigError
from study.spec import load_spec

ARMS = """
name: t
dataset: {kind: shapes, images: 60}
fixed: {layers: 1}
space:
  inject: {choice: [init, pre, attention]}
  cell: {choice: [lstm, gru, lstm_peephole]}
  seed_h: {choice: [false, true], when: {inject: init}}
  epochs: {choice: [2, 3]}
  lr: {loguniform: [1.0e-3, 1.0e-2]}
arms:
  seed: {inject: init, cell: [lstm, lstm_peephole], seed_h: false}
  init: {inject: init, seed_h: true}
  pre: {inject: pre}
  attention: {inject: attention}
target: seed
search: {trials: 8, epochs_per_arm: 5}
asha: {max_epochs: 3, grace_period: 1}
"""


def _load(tmp_path: Path, text: str):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return load_spec(path)


def test_arms_place_every_configuration_and_carry_roles_and_words(tmp_path):
    spec = _load(tmp_path, ARMS)
    assert spec.methods == ["seed", "init", "pre", "attention"] and spec.trials_per_method == 2
    assert spec.arm_of({"inject": "init", "cell": "lstm_peephole", "seed_h": False}) == "seed"
    assert spec.arm_of({"inject": "init", "cell": "gru", "seed_h": True}) == "init"
    assert spec.arm_of({"inject": "init", "cell": "gru", "seed_h": False}) is None  # in no arm: never proposed
    assert spec.arm_of({"inject": "pre", "cell": "gru"}) == "pre"
    assert spec.arm_set.roles() == {"seed": "target", "init": "competitor", "pre": "competitor",
                                    "attention": "competitor"}
    colors = spec.arm_set.colors()
    assert len(set(colors.values())) == 4  # two init arms, two colours
    assert "c0 of the first LSTM layer only" in spec.arm_set.describe("seed")
    assert "h0 of the first layer, and c0 too" in spec.arm_set.describe("init")
    name = spec.run_name({"inject": "init", "cell": "lstm", "seed_h": False, "epochs": 2})
    assert name == "seed-init-lstm-1x256-word"
    assert spec.trial_config({"inject": "pre", "cell": "gru", "epochs": 2}).epochs == 2  # searched schedule length


@pytest.mark.parametrize("change, needles", [
    (("seed: {inject: init, cell: [lstm, lstm_peephole], seed_h: false}", "seed: {inject: init, cell: [rnn]}"),
     ["arms.seed", "cell = 'rnn' is outside the space"]),
    (("seed: {inject: init, cell: [lstm, lstm_peephole], seed_h: false}", "seed: {inject: init, dropout: 0.1}"),
     ["arms.seed", "'dropout' is not a searched parameter"]),
    (("seed: {inject: init, cell: [lstm, lstm_peephole], seed_h: false}", "seed: {inject: init, cell: [lstm]}"),
     ["arms 'seed' and 'init' overlap", "seed_h"]),
    (("target: seed", "target: sead"), ["target: 'sead' is not an arm"]),
    (("target: seed", ""), ["name the target arm"]),
    (("pre: {inject: pre}", "pre: {inject: pre, seed_h: true}"), ["arms.pre", "seed_h is sampled only where inject"]),
    (("pre: {inject: pre}", "pre: {cell: gru}"), ["arms.pre", "hold inject at one value"]),
    (("target: seed", "target: seed\nstratify: inject"), ["not both"]),
    (("epochs: {choice: [2, 3]}", "epochs: {choice: [2, 9]}"), ["space.epochs", "exceeds asha.max_epochs"]),
    (("search: {trials: 8, epochs_per_arm: 5}",
      "search: {trials: 8, points_to_evaluate: [{inject: init, cell: gru, seed_h: false}]}"),
     ["points_to_evaluate[0]", "lies in no arm"]),
])
def test_bad_arms_are_refused_naming_the_arm(tmp_path, change, needles):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, ARMS.replace(*change))
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_each_arm_searches_its_own_part_of_the_space(tmp_path):
    """The searcher proposes round-robin over the arms, each point inside its arm (the seed arm never a GRU)."""
    from study.tuning.search import StudySearcher

    spec = _load(tmp_path, ARMS)
    searcher = StudySearcher(spec)
    configs = [searcher.suggest(f"t{i}") for i in range(8)]
    arms = [spec.arm_of(c) for c in configs]
    assert sorted(arms) == sorted(spec.methods * 2)
    assert all(c["cell"] in ("lstm", "lstm_peephole") and c["seed_h"] is False
               for c, a in zip(configs, arms) if a == "seed")
    assert all(c["seed_h"] is True for c, a in zip(configs, arms) if a == "init")
    assert searcher.suggest("t8") == StudySearcher.FINISHED  # 2 trials per arm


def test_the_arm_budget_stops_trials_and_proposals_and_survives_a_restore(tmp_path):
    """An arm that has trained epochs_per_arm trial-epochs gets no new trial and its running trials stop; the count
    is shared by the searcher and the scheduler through a pickle (as Tune restores them) and the searcher's JSON."""
    from ray.tune.schedulers import TrialScheduler

    from study.tuning.budget import ArmBudget
    from study.tuning.search import PerMethodASHA, StudySearcher

    spec = _load(tmp_path, ARMS.replace("trials: 8", "trials: 40").replace("max_epochs: 3", "max_epochs: 9"))
    budget = ArmBudget(spec.search.epochs_per_arm)
    searcher, scheduler = StudySearcher(spec, budget), PerMethodASHA(spec, budget)
    searcher, scheduler = pickle.loads(pickle.dumps((searcher, scheduler)))
    assert searcher.budget is scheduler.budget
    budget = searcher.budget

    class Trial:  # what the scheduler reads of Tune's Trial
        def __init__(self, trial_id, config):
            self.trial_id, self.config = trial_id, config

    first = [searcher.suggest(f"t{i}") for i in range(4)]  # one per arm
    pre_id = f"t{[spec.arm_of(c) for c in first].index('pre')}"
    pre = Trial(pre_id, first[int(pre_id[1:])])
    scheduler.on_trial_add(None, pre)
    decisions = []
    for epoch in range(1, 6):
        result = {"epoch": epoch, spec.metric: 0.1 * epoch, "training_iteration": epoch, "time_total_s": epoch}
        searcher.on_trial_result(pre_id, result)
        decisions.append(scheduler.on_trial_result(None, pre, result))
    # ASHA alone would go on (one trial in its bracket); the arm's fifth trial-epoch ends it.
    assert decisions == [TrialScheduler.CONTINUE] * 4 + [TrialScheduler.STOP] and budget.spent("pre") == 5
    proposed = [spec.arm_of(searcher.suggest(f"n{i}")) for i in range(6)]
    assert "pre" not in proposed  # its budget is spent

    searcher.save(str(tmp_path / "searcher-state-x.json"))
    restored_budget = ArmBudget(spec.search.epochs_per_arm)
    fresh = StudySearcher(spec, restored_budget)
    fresh.restore(str(tmp_path / "searcher-state-x.json"))
    assert fresh.budget is restored_budget and restored_budget.spent("pre") == 5 and restored_budget.exhausted("pre")


def test_optuna_sees_each_arms_choices_only(tmp_path):
    spec = _load(tmp_path, ARMS)
    from study.tuning.search import define_by_run

    trial = optuna.create_study().ask()
    sampled = define_by_run(spec, spec.arm_set.arms["seed"], trial)
    assert trial.distributions["cell"].choices == ("lstm", "lstm_peephole")
    assert sampled["seed_h"] is False and "seed_h" not in trial.distributions  # held, not sampled


def test_the_test_split_cannot_choose_the_checkpoint(small_shapes, small_prepared):
    """A confirm run ends with its best validation epoch's model, chosen before the test split is read: with the
    test split's images and captions swapped around, it keeps the same epoch and the same weights (and only its test
    scores change)."""
    import dataclasses

    import torch

    from study.config import TrialConfig
    from study.stages.confirm import confirm_one
    from study.trial.checkpoints import load_checkpoint

    cfg = TrialConfig(dataset=small_shapes, inject="init", hidden=32, embed=16, epochs=4, lr=2e-2, min_count=1,
                      batch_size=32, seed=1000, precision="fp32", select_metric="val_CIDEr-D", val_beam_size=2)
    data = small_prepared
    test = data.images["test"]
    swapped_images = dataclasses.replace(test, rows=test.rows[::-1].copy(), references=test.references[::-1])
    tokens = {setting: dataclasses.replace(tokens, splits={**tokens.splits, "test": dataclasses.replace(
        tokens.splits["test"], ids=tokens.splits["test"].ids[::-1].copy())})
        for setting, tokens in data.token_sets.items()}
    swapped = dataclasses.replace(data, images={**data.images, "test": swapped_images}, token_sets=tokens)
    torch.set_num_threads(1)
    runs = [confirm_one(cfg, d) for d in (data, swapped)]
    assert runs[0]["selection"] == runs[1]["selection"]
    assert runs[0]["selection"]["rule"] == "best_val" and 1 <= runs[0]["selection"]["chosen_epoch"] <= 4
    best = max(runs[0]["history"], key=lambda e: e["val_CIDEr-D"])
    assert runs[0]["selection"]["chosen_epoch"] == best["epoch"]
    weights = []
    for run in runs:
        path = Path(f"/tmp/{id(run)}.pt")
        path.write_bytes(run["checkpoint"])
        state = load_checkpoint(path)
        weights.append(state["model"])
        assert state["epoch"] == run["selection"]["chosen_epoch"]  # the kept checkpoint is the chosen epoch's
        path.unlink()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert swapped.images["test"].references != data.images["test"].references  # the swap changed the test split


@pytest.mark.slow
def test_a_study_with_arms_spends_equal_trial_epochs_and_reports_its_protocol(tmp_path, small_shapes):
    """End to end on a real (tiny) study: two init arms (the seed's LSTM c0 model and h0+c0 seeding) beside merge,
    the schedule length searched, 4 trial-epochs per arm. Every arm spends its budget (each within one epoch of it),
    the comparator is fixed from validation before the confirm stage, every confirm run is scored at its chosen
    epoch, and the report shows the arms, the chosen epochs, the margin table and the ledger."""
    import json
    import os
    import subprocess
    import sys

    from tests.helpers import study_spec

    spec_path = study_spec(
        tmp_path, "armed", small_shapes, methods=("init", "merge"), stratify=None,
        space={"inject": {"choice": ["init", "merge"]}, "seed_h": {"choice": [False, True], "when": {"inject": "init"}},
               "epochs": {"choice": [1, 2]}, "lr": {"loguniform": [3e-3, 1e-2]}},
        arms={"seed": {"inject": "init", "seed_h": False}, "init": {"inject": "init", "seed_h": True},
              "merge": {"inject": "merge"}},
        target="seed", search={"trials": 12, "epochs_per_arm": 4, "seed": 1},
        asha={"max_epochs": 2, "grace_period": 1, "reduction_factor": 2},
        confirm={"top_k": 1, "seeds": 1, "beam_size": 2, "margin": 0.05})
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    run = subprocess.run([sys.executable, "-m", "study", "run", str(spec_path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    import study

    found = study.load(tmp_path / "runs" / "armed")
    trials = found.trials()
    spent = trials.groupby("arm")["epochs"].sum().to_dict()
    assert set(spent) == {"seed", "init", "merge"}
    assert all(4 <= n <= 5 for n in spent.values()), spent  # the budget, plus at most one epoch of a running trial
    assert set(trials.loc[trials["arm"] == "seed", "seed_h"]) == {False}
    comparator = json.loads((found.paths.root / "comparator.json").read_text())
    assert comparator["comparator"] in ("init", "merge") and set(comparator["values"]) == {"init", "merge"}
    runs = found.confirm_runs()
    assert set(runs["method"]) == {"seed", "init", "merge"} and set(runs["selection"]) == {"best_val"}
    # Each arm's confirm runs train that arm's model (an arm's name is not an inject value).
    assert runs.set_index("method")["inject"].to_dict() == {"seed": "init", "init": "init", "merge": "merge"}
    assert runs.loc[runs["method"] == "seed", "seed_h"].tolist() == [False]
    assert (runs["chosen_epoch"] <= runs["epochs"]).all()
    report = (found.paths.report / "report.md").read_text()
    for needle in ("## The arms compared", "image into c0 of the first LSTM layer only", "chosen epoch",
                   "4% of the comparator", "Earlier looks at these test splits", "search trial-epochs",
                   f"comparator fixed before the test split was scored ({comparator['comparator']})"):
        assert needle in report, needle
