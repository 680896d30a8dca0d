"""`search.time_budget_h`: a real study on shapes stops its search when the budget is spent, ends normally
(not as an interrupted study), and a resume gets only what is left, not the whole budget again."""

from __future__ import annotations

import json

import pytest

from study.tuning import SearchTimeBudget, read_search_time


def test_the_budget_is_summed_over_drivers(tmp_path):
    ledger = tmp_path / "search_time.json"
    first = SearchTimeBudget(100.0, ledger)
    assert not first.stop_all()
    ledger.write_text(json.dumps({"budget_s": 100.0, "used_s": 100.0, "spent": False}))  # an earlier driver
    restored = SearchTimeBudget(100.0, ledger)
    assert restored.stop_all()  # reads what was used and stops at once
    assert read_search_time(ledger)["spent"]


@pytest.mark.slow
def test_a_spent_budget_ends_the_search_normally_and_resume_adds_no_trials(tmp_path, small_shapes, small_prepared):
    import yaml

    from study.spec import load_spec
    from study.tuning import run_study, shutdown

    spec_path = tmp_path / "budget.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "budget",
        "dataset": {"kind": "shapes", "images": small_shapes.images, "image_size": small_shapes.image_size,
                    "seed": small_shapes.seed, "cache_dir": str(small_shapes.cache_dir)},
        "fixed": {"hidden": 16, "embed": 16, "min_count": 1, "batch_size": 80, "val_images": 10},
        "space": {"inject": {"choice": ["init", "none"]}, "lr": {"loguniform": [1e-3, 1e-2]}},
        "stratify": "inject",
        "search": {"trials": 60, "seed": 0, "time_budget_h": 15 / 3600},
        "asha": {"max_epochs": 2, "grace_period": 1, "reduction_factor": 2},
        "storage": str(tmp_path / "runs"),
    }))
    spec = load_spec(spec_path)
    try:
        outcome = run_study(spec, spec_path, progress=False)
    finally:
        shutdown()
    ledger = read_search_time(outcome.study_dir / "search_time.json")
    assert ledger["spent"] and ledger["used_s"] >= 15
    assert not outcome.interrupted
    ran = len(outcome.trials)
    assert 0 < ran < 60
    assert set(outcome.trials["status"]) <= {"completed", "stopped"}

    try:
        again = run_study(spec, spec_path, resume=True, progress=False)
    finally:
        shutdown()
    assert not again.interrupted
    assert len(again.trials) == ran  # the budget was spent: the resume proposes nothing new
