"""The search as Optuna studies, for ``optuna-dashboard sqlite:///<study>/optuna.db`` and ``trials_dataframe()``.

Written from the study's own records after each search (not from the searchers' live Optuna objects), so it shows
what happened: ASHA's stops as PRUNED, errors as FAIL, real start and end times, the learning curve.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.metric_table import in_points
from study.records import missing
from study.records.paths import StudyPaths
from study.records.trial_tables import space_value
from study.spec import StudySpec
from study.tuning.search import StudySearcher


def export_optuna_studies(spec: StudySpec) -> Path | None:
    """Write the study's search as Optuna studies into ``<study>/optuna.db`` (an Optuna RDB storage, one study per
    method group, named ``<study>.<method>``) for ``optuna-dashboard sqlite:///<study>/optuna.db`` and
    ``optuna.load_study(...).trials_dataframe()``. Written from the study's own records, so it shows what happened:
    each trial COMPLETE with its best epoch's value (a score in points), PRUNED where ASHA stopped it, FAIL where it
    errored; its real start and end (from the journal's epoch times), one intermediate value per epoch of the spec's
    metric, and user attributes linking it to its ``trial_id``, run name, MLflow run and method. Running trials are
    left out.
    Rebuilt whole after each search."""
    import optuna

    from study.records.trial_tables import load_trial_tables

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one INFO line per study written, as in GroupSearch
    paths = StudyPaths.of(spec.storage, spec.name)
    # values in points, as every other place a person reads a score (analysis.metric_table)
    trials, history = (in_points(frame) for frame in load_trial_tables(spec))
    if trials.empty:
        return None
    times = _trial_times(paths)
    runs = json.loads(paths.mlflow_runs.read_text()) if paths.mlflow_runs.is_file() else {}
    target = paths.optuna_db
    tmp = target.with_suffix(".db.tmp")
    tmp.unlink(missing_ok=True)
    storage = f"sqlite:///{tmp}"
    searcher = StudySearcher(spec)
    for key, arm in searcher.group_arms().items():
        fixed = arm.fixed() if arm is not None else {}
        study = optuna.create_study(study_name=f"{spec.name}.{key}", storage=storage,
                                    direction="maximize" if spec.mode == "max" else "minimize")
        study.set_user_attr("metric", spec.metric)  # what each value is (the trial's best epoch)
        with warnings.catch_warnings():  # "experimental since 3.2", stable in use since; the warning is noise
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([spec.metric])  # the dashboard's axis says val_CIDEr-D, not "Objective 0"
        mine = trials[trials["arm"] == key] if arm is not None else trials
        for _, row in mine.iterrows():
            frozen = _frozen_trial(spec, fixed, row, history, times.get(row["trial_id"]), runs)
            if frozen is not None:
                study.add_trial(frozen)
    os.replace(tmp, target)  # a database built beside it, then swapped in whole
    return target


_OPTUNA_STATES = {"completed": "COMPLETE", "stopped": "PRUNED", "errored": "FAIL"}


def _frozen_trial(spec: StudySpec, fixed: dict[str, Any], row: pd.Series, history: pd.DataFrame,
                  times: tuple[int, int] | None, runs: dict[str, str]):
    """One finished search trial as an Optuna ``FrozenTrial`` (None for a trial still running)."""
    import datetime

    import optuna
    from optuna.trial import TrialState

    state = _OPTUNA_STATES.get(str(row["status"]))
    if state is None:
        return None
    params, distributions = {}, {}
    for name, param in spec.space.items():
        value = space_value(row, name)
        if name in fixed or missing(value):
            continue
        value = value.item() if hasattr(value, "item") else value
        params[name], distributions[name] = value, _distribution(param)
    curve = history[history["trial_id"] == row["trial_id"]] if len(history) else history
    intermediate = {int(e): float(v) for e, v in zip(curve.get("epoch", []), curve.get(spec.metric, []))
                    if not missing(v)}
    value = row.get(spec.metric)
    now = int(datetime.datetime.now().timestamp() * 1000)
    start_ms, end_ms = times or (now, now)  # no journalled time at all: a trial of a study older than them
    start, complete = (datetime.datetime.fromtimestamp(ms / 1000) for ms in (start_ms, end_ms))
    attrs = {"trial_id": row["trial_id"], "run": row.get("run"), "method": row.get("inject"), "arm": row.get("arm"),
             "status": row["status"], "epochs": int(row.get("epochs") or 0)}
    if row["trial_id"] in runs:
        attrs["mlflow_run_id"] = runs[row["trial_id"]]
    if row["status"] == "errored":
        attrs["error"] = str(row.get("error"))[:300]
    return optuna.trial.FrozenTrial(
        number=0, trial_id=0, state=TrialState[state], params=params, distributions=distributions,
        value=float(value) if state == "COMPLETE" and not missing(value) else None, values=None,
        datetime_start=start, datetime_complete=complete, user_attrs=attrs, system_attrs={},
        intermediate_values=intermediate)


def _distribution(param):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if param.choice is not None:
        return CategoricalDistribution(list(param.choice))
    if param.uniform is not None:
        return FloatDistribution(*param.uniform)
    if param.loguniform is not None:
        return FloatDistribution(*param.loguniform, log=True)
    if param.int_ is not None:
        return IntDistribution(*param.int_)
    low, high, step = param.quniform
    if all(float(v).is_integer() for v in (low, high, step)):
        return IntDistribution(int(low), int(high), step=int(step))
    return FloatDistribution(low, high, step=step)


def _trial_times(paths: StudyPaths) -> dict[str, tuple[int, int]]:
    """Per trial, its (start, end) in epoch milliseconds from the journal: its first ``trial_start`` and last
    ``trial_end`` (or, in journals from before those carried a time, its first epoch's end minus that epoch's
    seconds, and its last epoch's end)."""
    from study.tracking.journal import Journal

    journal = Journal(paths.journal, paths.journal_sent)
    starts: dict[str, int] = {}
    ends: dict[str, int] = {}
    for event in journal.events("trial_result"):
        trial, at = event["trial"], int(event["time"])
        starts.setdefault(trial, at - int(1000 * float(event["metrics"].get("epoch_seconds", 0.0))))
        ends[trial] = max(ends.get(trial, at), at)
    for event in journal.events("trial_start"):
        if "time" in event:
            starts[event["trial"]] = min(starts.get(event["trial"], event["time"]), event["time"])
    for event in journal.events("trial_end"):
        if "time" in event:
            ends[event["trial"]] = max(ends.get(event["trial"], event["time"]), event["time"])
    return {trial: (starts[trial], ends.get(trial, starts[trial])) for trial in starts}
