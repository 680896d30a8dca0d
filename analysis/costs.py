"""What each arm (or method) of a study cost: search trial-epochs, and CPU (and GPU) time in the search and the
confirm stage, for the report."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from analysis.grouping import group_column
from analysis.render import Block


def cost_blocks(trials: pd.DataFrame, history: pd.DataFrame, runs: pd.DataFrame,
                 resources: Mapping[str, float]) -> list[Block]:
    """What each method cost: trial-epochs' wall time in the search and confirm runs' wall time, times the CPUs
    (and GPUs) each trial held, in hours. Start-up, Ray and idle time are not charged to any method."""
    cpu, gpu = float(resources.get("cpu", 1.0)), float(resources.get("gpu", 0.0))
    by = group_column(history) if not history.empty else "inject"
    search = (history.groupby(by)["epoch_seconds"].sum() if not history.empty and
              {by, "epoch_seconds"} <= set(history.columns) else pd.Series(dtype=float))
    confirm = (runs.groupby("method")["seconds"].sum() if not runs.empty and "seconds" in runs
               else pd.Series(dtype=float))
    methods = list(dict.fromkeys([*search.index, *confirm.index]))
    if not methods:
        return []
    group = group_column(trials)
    trial_counts = trials[group].value_counts() if group in trials else pd.Series(dtype=int)
    # Search compute in trial-epochs: what search.epochs_per_arm equalises across arms.
    trial_epochs = trials.groupby(group)["epochs"].sum() if {group, "epochs"} <= set(trials) else pd.Series(dtype=int)
    run_counts = runs["method"].value_counts() if "method" in runs else pd.Series(dtype=int)
    header = ["method", "search trials", "search trial-epochs", "search CPU time", "confirm runs", "confirm CPU time",
              "total CPU time"]
    header += ["total GPU time"] if gpu else []
    rows = []
    for m in methods:
        s_h, c_h = search.get(m, 0.0) / 3600, confirm.get(m, 0.0) / 3600
        row = [m, int(trial_counts.get(m, 0)), int(trial_epochs.get(m, 0)), _time(cpu * s_h),
               int(run_counts.get(m, 0)), _time(cpu * c_h),
               _time(cpu * (s_h + c_h))]
        rows.append(row + ([_time(gpu * (s_h + c_h))] if gpu else []))
    return [("p", f"Compute each method used ({cpu:g} CPU{f' and {gpu:g} GPU' if gpu else ''} per trial or run; "
                  "wall time of its epochs in the search and of its confirm runs):"), ("table", header, rows)]


def _time(hours: float) -> str:
    """Hours of compute in a unit that shows them: a quickstart's 0.004 h reads 14 s, not 0.00."""
    if hours >= 1:
        return f"{hours:.2f} h"
    return f"{60 * hours:.1f} min" if hours >= 1 / 60 else f"{3600 * hours:.0f} s"
