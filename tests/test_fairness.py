"""The machinery that makes the comparison fair, unit by unit: equal trial budgets per method, conditional
parameters sampled only where they apply, the grid sampler covering its grid, the learning-rate schedules,
and the confirm stage retraining exactly each method's best trials (scored by their best epoch)."""

from __future__ import annotations

import math
from collections import Counter

import pandas as pd
import pytest

from study.config import TrialConfig
from study.records.trial_tables import confirm_configs, confirmed_trials
from study.spec import StudySpec
from study.trial.training import _lr_lambda
from study.tuning.search import StudySearcher

METHODS = ["init", "pre", "par", "merge", "attention", "none"]


def _spec(**overrides) -> StudySpec:
    values = {"name": "fair", "space": {"inject": {"choice": METHODS}, "lr": {"loguniform": [1e-4, 1e-2]},
                                       "attention_dim": {"choice": [32, 64], "when": {"inject": "attention"}}},
              "stratify": "inject", "search": {"trials": 24, "seed": 0}}
    values.update(overrides)
    return StudySpec.model_validate(values)


def test_every_method_gets_the_same_number_of_trials_and_conditions_hold():
    searcher = StudySearcher(_spec())
    configs = []
    for i in range(30):  # more asks than the budget: the searcher says when it is done
        config = searcher.suggest(f"t{i}")
        if config == StudySearcher.FINISHED:
            break
        configs.append(config)
        searcher.on_trial_complete(f"t{i}", {"val_CIDEr-D": 0.1 * (i % 5)})
    assert Counter(c["inject"] for c in configs) == {m: 4 for m in METHODS}
    for c in configs:
        assert ("attention_dim" in c) == (c["inject"] == "attention")
        assert 1e-4 <= c["lr"] <= 1e-2
    # Handed out round-robin: at any point no method is more than one trial ahead of another.
    for n in range(1, len(configs) + 1):
        counts = Counter(c["inject"] for c in configs[:n])
        assert max(counts.values()) - min(counts.get(m, 0) for m in METHODS) <= 1


def test_grid_search_proposes_each_grid_point_once_per_method():
    spec = _spec(space={"inject": {"choice": ["init", "par"]}, "cell": {"choice": ["lstm", "gru"]},
                        "hidden": {"choice": [64, 128]}},
                 search={"algorithm": "grid", "trials": 8, "seed": 0})
    searcher = StudySearcher(spec)
    configs = [searcher.suggest(f"t{i}") for i in range(8)]
    points = Counter((c["inject"], c["cell"], c["hidden"]) for c in configs)
    assert len(points) == 8 and set(points.values()) == {1}


@pytest.mark.parametrize("schedule, start, middle, end", [
    ("constant", 1.0, 1.0, 1.0),
    ("cosine", 1.0, 0.05 + 0.95 * 0.5, 0.05),   # never below 5% of the rate
    ("step", 1.0, 0.5, 0.25),                   # halved at each third
])
def test_learning_rate_schedules(schedule, start, middle, end):
    cfg = TrialConfig(schedule=schedule, epochs=3)
    factor = _lr_lambda(cfg, steps_per_epoch=100)  # 300 steps
    assert factor(0) == pytest.approx(start)
    assert factor(150) == pytest.approx(middle)
    assert factor(299) == pytest.approx(end, abs=0.01)


def test_confirm_stage_retrains_each_methods_best_trials_by_their_best_epoch():
    spec = _spec(confirm={"top_k": 2, "seeds": 3})
    trials = pd.DataFrame({
        "trial_id": ["a", "b", "c", "d", "e"], "inject": ["init", "init", "init", "attention", "attention"],
        "status": ["completed", "stopped", "errored", "stopped", "completed"],
        "val_CIDEr-D": [0.40, 0.55, 0.90, 0.30, 0.35], "lr": [1e-3, 2e-3, 3e-3, 4e-3, 5e-3],
        "attention_dim": [math.nan, math.nan, math.nan, 64, 32]})
    chosen = confirmed_trials(spec, trials)
    # An errored trial is never confirmed however well it scored; ranks follow the metric.
    assert list(zip(chosen["method"], chosen["config_rank"], chosen["trial_id"])) == [
        ("init", 1, "b"), ("init", 2, "a"), ("attention", 1, "e"), ("attention", 2, "d")]
    runs = confirm_configs(spec, trials)
    assert len(runs) == 4 * 3
    by_run = {(m, r, s): cfg for m, r, s, cfg in runs}
    # Each run trains its own method (a bug once trained every confirm run as the default, init).
    assert all(cfg.inject == m for m, _, _, cfg in runs) and {m for m, *_ in runs} == {"init", "attention"}
    assert by_run["init", 1, 2].lr == 2e-3 and by_run["init", 1, 2].seed == 1002
    assert by_run["attention", 1, 0].attention_dim == 32
    assert by_run["init", 2, 0].attention_dim == TrialConfig().attention_dim  # not sampled: the default


def test_a_confirm_result_trained_with_another_config_is_set_aside_and_trained_again(tmp_path):
    """The flickr8k study of 2026-11-24 had confirm results trained as init under every method's name: the
    confirm stage must not report them, but move them aside (nothing deleted) and train those runs again."""
    import json

    from study.records.paths import StudyPaths
    from study.stages.confirm import set_aside_if_stale

    spec = _spec(confirm={"top_k": 1, "seeds": 1})
    trials = pd.DataFrame({"trial_id": ["a", "e"], "inject": ["init", "attention"], "status": ["completed"] * 2,
                           "val_CIDEr-D": [0.4, 0.3], "lr": [1e-3, 5e-3], "attention_dim": [math.nan, 32]})
    (init_run, attention_run) = confirm_configs(spec, trials)
    paths = StudyPaths.at(tmp_path)
    paths.confirm.mkdir()

    def stored(name: str, cfg: TrialConfig, **changes) -> None:
        config = {**cfg.model_dump(mode="json", by_alias=True, exclude={"dataset"}), **changes}
        config.pop("val_captions", None)  # a field added since: not compared
        paths.confirm_result(name).write_text(json.dumps({  # a whole result as the stage writes it (no images)
            "method": name.split("-")[0], "config_rank": 1, "seed": 0, "config": config, "scores": {},
            "captions": [], "per_image": {}}))
        paths.confirm_model(name).write_bytes(b"model")

    stored("init-r1-s0", init_run[3])
    stored("attention-r1-s0", attention_run[3], inject="init")
    assert not set_aside_if_stale(paths, "init-r1-s0", init_run[3])
    assert set_aside_if_stale(paths, "attention-r1-s0", attention_run[3])
    assert [p.name for p in paths.confirm_results()] == ["init-r1-s0.json"]
    assert sorted(p.name for p in (paths.confirm / "stale").iterdir()) == ["attention-r1-s0.json",
                                                                            "attention-r1-s0.pt"]
    assert not set_aside_if_stale(paths, "attention-r1-s0", attention_run[3])  # nothing left to set aside


def test_asha_compares_each_methods_trials_only_with_their_own_method():
    """init learns fast, none slowly: one shared ASHA cuts every none trial at the first rung, so the search never
    sees a trained none (or pre, or par); per-method ASHA promotes the best third of each method's own trials."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from study.tuning.search import PerMethodASHA, build_scheduler

    space = {"inject": {"choice": ["init", "none"]}, "lr": {"loguniform": [1e-4, 1e-2]}}
    asha = {"max_epochs": 9, "grace_period": 1, "reduction_factor": 3}
    scores = {"init": [0.50, 0.45, 0.40], "none": [0.10, 0.08, 0.06]}  # val CIDEr-D after epoch 1

    def continued(spec: StudySpec) -> dict[str, list[bool]]:
        scheduler = build_scheduler(spec)
        out: dict[str, list[bool]] = {}
        for method, values in scores.items():
            for i, value in enumerate(values):
                trial = Trial("caption", config={"inject": method, "lr": 1e-3}, trial_id=f"{method}{i}", stub=True)
                scheduler.on_trial_add(None, trial)
                decision = scheduler.on_trial_result(None, trial, {"epoch": 1, "val_CIDEr-D": value})
                out.setdefault(method, []).append(decision == TrialScheduler.CONTINUE)
        return out

    per_method = _spec(space=space, search={"trials": 6, "seed": 0}, asha=asha)
    assert isinstance(build_scheduler(per_method), PerMethodASHA)  # the default with stratify: inject
    assert continued(per_method) == {"init": [True, False, False], "none": [True, False, False]}
    shared = _spec(space=space, search={"trials": 6, "seed": 0}, asha={**asha, "per_method": False})
    assert continued(shared) == {"init": [True, False, False], "none": [False, False, False]}


def test_points_to_evaluate_go_first_in_their_methods_budget_and_survive_a_restore(tmp_path):
    # Two points for init (one leaves lr out: the searcher draws it), one for par; 4 trials per method.
    points = [{"inject": "init", "lr": 1.2e-3, "cell": "gru"}, {"inject": "par", "lr": 3.0e-3}, {"inject": "init"}]
    spec = _spec(space={"inject": {"choice": ["init", "par"]}, "cell": {"choice": ["lstm", "gru"]},
                        "lr": {"loguniform": [1e-4, 1e-2]}},
                 search={"trials": 8, "seed": 0, "points_to_evaluate": points})
    from study.tuning.runner import describe_budget

    assert "tried first: inject=init, lr=0.0012, cell=gru" in describe_budget(spec)  # what --dry-run prints
    searcher = StudySearcher(spec)
    first = [searcher.suggest(f"t{i}") for i in range(3)]  # round robin: init, par, init
    assert first[0] == {"inject": "init", "lr": 1.2e-3, "cell": "gru"}
    assert first[1]["inject"] == "par" and first[1]["lr"] == 3.0e-3 and first[1]["cell"] in ("lstm", "gru")
    assert first[2]["inject"] == "init" and 1e-4 <= first[2]["lr"] <= 1e-2
    searcher.on_trial_complete("t0", {"val_CIDEr-D": 0.4})

    # Saved after init's points were asked: the restored searcher must not propose them again.
    searcher.save(str(tmp_path / "state.json"))
    restored = StudySearcher(spec)
    restored.restore(str(tmp_path / "state.json"))
    rest = [restored.suggest(f"u{i}") for i in range(6)]
    assert Counter(c["inject"] for c in first + rest[:5]) == {"init": 4, "par": 4}
    assert rest[5] == StudySearcher.FINISHED
    assert all(c["lr"] not in (1.2e-3, 3.0e-3) for c in rest[:5])

    # Restored before par's point was asked, it is still proposed first.
    fresh = StudySearcher(spec)
    fresh.suggest("v0")
    fresh.save(str(tmp_path / "early.json"))
    again = StudySearcher(spec)
    again.restore(str(tmp_path / "early.json"))
    assert again.suggest("v1")["lr"] == 3.0e-3


def test_the_confirm_stage_starts_its_longest_runs_first():
    """With 2 slots, the 12-epoch Flickr8k study's three ~27-min attention runs, queued after twelve ~9-min
    runs, ended with one training alone; submitted first, the short runs fill the other slot. The expected time
    is the source trial's seconds per epoch times the run's epochs; the seeds of one config stay in order."""
    from study.stages.confirm import longest_first

    spec = _spec(confirm={"top_k": 1, "seeds": 2})
    trials = pd.DataFrame({
        "trial_id": ["a", "b", "c"], "inject": ["init", "pre", "attention"], "status": ["completed"] * 3,
        "val_CIDEr-D": [0.5, 0.4, 0.45], "lr": [1e-3] * 3, "attention_dim": [math.nan, math.nan, 64],
        "train_seconds": [90.0, 60.0, 400.0], "epochs": [2, 3, 3]})  # 45, 20 and 133 s an epoch
    runs = confirm_configs(spec, trials)
    assert [(m, s) for m, _, s, _ in runs][:2] == [("init", 0), ("init", 1)]  # the spec's order
    ordered = longest_first(runs, spec, trials)
    assert [(m, s) for m, _, s, _ in ordered] == [("attention", 0), ("attention", 1), ("init", 0), ("init", 1),
                                                  ("pre", 0), ("pre", 1)]
    assert longest_first(runs, spec, trials.drop(columns=["train_seconds"])) == runs  # no timing: as planned


def test_each_arms_confirm_runs_train_that_arms_inject_not_the_default():
    """Arms (9c77fa3) made the method column an arm's name (seed, none) and dropped inject from the confirmed
    rows, so every confirm run of an arms study trained the default inject, init (seen in a quickstart's
    confirm/none-r1-s0.json: inject init, 121714 parameters where its search trials had 39730)."""
    spec = _spec(space={"inject": {"choice": ["init", "pre", "none"]}, "seed_h": {"choice": [False, True],
                                                                                 "when": {"inject": "init"}},
                        "lr": {"loguniform": [1e-4, 1e-2]}},
                 arms={"seed": {"inject": "init", "seed_h": False}, "pre": {"inject": "pre"},
                       "none": {"inject": "none"}}, target="seed", stratify=None, confirm={"top_k": 1, "seeds": 1})
    trials = pd.DataFrame({"trial_id": ["a", "b", "c"], "arm": ["seed", "pre", "none"],
                           "inject": ["init", "pre", "none"], "seed_h": [False, math.nan, math.nan],
                           "status": ["completed"] * 3, "val_CIDEr-D": [0.5, 0.4, 0.1], "lr": [1e-3, 2e-3, 3e-3]})
    runs = {method: cfg for method, _, _, cfg in confirm_configs(spec, trials)}
    assert {m: (cfg.inject, cfg.lr) for m, cfg in runs.items()} == {
        "seed": ("init", 1e-3), "pre": ("pre", 2e-3), "none": ("none", 3e-3)}
    assert runs["seed"].seed_h is False
