"""`search.time_budget_h`: a real study on shapes stops its search when the budget is spent, ends normally
(not as an interrupted study), and a resume gets only what is left, not the whole budget again."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from study.context import StudyContext
from study.records import read_search_time
from study.tuning.callbacks import SearchTimeBudget
from tests.helpers import study_spec


def test_the_budget_is_summed_over_drivers(tmp_path):
    ledger = tmp_path / "search_time.json"
    first = SearchTimeBudget(100.0, ledger)
    assert not first.stop_all()
    ledger.write_text(json.dumps({"budget_s": 100.0, "used_s": 100.0, "spent": False}))  # an earlier driver
    restored = SearchTimeBudget(100.0, ledger)
    assert restored.stop_all()  # reads what was used and stops at once
    assert read_search_time(ledger).spent


@pytest.mark.slow
def test_a_spent_budget_ends_the_search_normally_and_resume_adds_no_trials(tmp_path, small_shapes, small_prepared):
    from study.spec import load_spec
    from study.tuning import run_study, shutdown

    spec_path = study_spec(
        tmp_path, "budget", small_shapes, methods=["init", "none"], lr=(1e-3, 1e-2),
        fixed={"hidden": 16, "embed": 16, "min_count": 1, "batch_size": 80, "val_images": 10},
        # Far more trials than any machine finishes in 15 s (CI, with more cores, ran 60 in 11 s): the budget,
        # not the trial count, must be what ends this search.
        search={"trials": 5000, "seed": 0, "time_budget_h": 15 / 3600},
        asha={"max_epochs": 2, "grace_period": 1, "reduction_factor": 2},
        resources=None, max_failures=None, confirm=None)
    spec = load_spec(spec_path)
    try:
        outcome = run_study(StudyContext.from_spec(spec, spec_path), progress=False)
    finally:
        shutdown()
    ledger = read_search_time(outcome.study_dir / "search_time.json")
    assert ledger.spent and ledger.used_s >= 15
    assert not outcome.interrupted
    ran = len(outcome.trials)
    assert 0 < ran < 5000
    assert set(outcome.trials["status"]) <= {"completed", "stopped"}
    # The searchers' Optuna studies, persisted for optuna-dashboard and trials_dataframe().
    import optuna

    storage = f"sqlite:///{outcome.study_dir / 'optuna.db'}"
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    assert names == ["budget.init", "budget.none"]
    frames = [optuna.load_study(study_name=n, storage=storage).trials_dataframe() for n in names]
    # Every trial the searchers were told of; those the budget stopped mid-epoch were still running for them.
    assert ran - 2 <= sum(len(f) for f in frames) <= ran
    # The value column is named after the metric (set_metric_names), as optuna-dashboard's axis is.
    assert all("params_lr" in f and f.loc[f["state"] == "COMPLETE", "value_val_CIDEr-D"].notna().all()
               for f in frames)
    # Written as it happened (issue 21): ASHA's stops as PRUNED, real times, the learning curve, the links back.
    both = pd.concat(frames, ignore_index=True)
    table = outcome.trials
    assert sorted(both["user_attrs_trial_id"]) == sorted(table.loc[table.status != "running", "trial_id"])
    assert (both["state"] == "PRUNED").sum() == (table["status"] == "stopped").sum()
    assert set(both["user_attrs_method"]) == {"init", "none"}
    for trial in optuna.load_study(study_name=names[0], storage=storage).trials:  # one point per epoch trained
        assert sorted(trial.intermediate_values) == list(range(1, trial.user_attrs["epochs"] + 1))

    try:
        again = run_study(StudyContext.from_spec(spec, spec_path), resume=True, progress=False)
    finally:
        shutdown()
    assert not again.interrupted
    assert len(again.trials) == ran  # the budget was spent: the resume proposes nothing new


def test_a_study_started_before_checkpoints_carried_history_reads_tunes_result_json(tmp_path):
    """The flickr8k study of 2026-11-24 ran on code whose checkpoints had no history.json: its epochs come
    from Tune's result.json lines (plain JSON), the last report of a repeated epoch winning."""
    import pyarrow.fs as pafs

    from study.records.trial_tables import _trial_history

    folder = tmp_path / "init-lstm-1x64-word-abc"
    (folder / "checkpoint_000000").mkdir(parents=True)
    lines = [{"epoch": 1, "val_CIDEr-D": 0.1, "time_this_iter_s": 3.0}, {"epoch": 2, "val_CIDEr-D": 0.2},
             {"epoch": 2, "val_CIDEr-D": 0.25}]
    (folder / "result.json").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    history = _trial_history(pafs.LocalFileSystem(), str(folder))
    assert history == [{"epoch": 1, "val_CIDEr-D": 0.1}, {"epoch": 2, "val_CIDEr-D": 0.25}]
