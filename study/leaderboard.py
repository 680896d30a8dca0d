"""The leaderboard: the best trial of each injection method, from the study's own state.

The trials come from ``study.records.trial_tables.load_trial_tables`` (Tune's trial folders in the study's storage),
where a
trial's score is its best epoch by the spec's metric, the same score Optuna is told and the confirm stage
ranks by. MLflow is only a mirror of those results: a tracking server that is down, or a store that missed
events, does not change the leaderboard.
"""

from __future__ import annotations

import pandas as pd

from analysis.metric_table import describe_metric

COLUMNS = ["run", "inject", "cell", "layers", "hidden", "tokens", "lr", "dropout", "status", "epochs", "best_epoch",
           "val_CIDEr-D", "val_BLEU-4", "val_bpc", "val_loss"]


def leaderboard(trials: pd.DataFrame, *, metric: str = "val_CIDEr-D", mode: str = "max",
                best_per_method: bool = True) -> pd.DataFrame:
    """The trials (``load_trial_tables``' first frame) sorted by ``metric`` as it was at each trial's best
    epoch (best by the spec's metric: a trial has one score); with ``best_per_method`` only the best trial of
    each injection method, the overall best first."""
    if trials.empty or metric not in trials:
        return trials.reindex(columns=[c for c in COLUMNS if c in trials])
    frame = trials.sort_values(metric, ascending=mode == "min", na_position="last")
    if best_per_method and "inject" in frame:
        frame = frame.groupby("inject", sort=False).head(1)
    cols = [c for c in COLUMNS if c in frame] + [metric] * (metric not in COLUMNS)
    return frame[cols].reset_index(drop=True)


def format_table(frame: pd.DataFrame, fmt: str = "text") -> str:
    if frame.empty:
        return "(no trials yet)"
    shown = frame.copy()
    for col in shown.columns:
        metric = describe_metric(col)
        if metric is not None and metric.scale != 1:  # scores as papers print them (x100); losses as they are
            shown[col] = metric.shown(shown[col])
    if fmt == "csv":
        return shown.to_csv(index=False)
    if fmt not in ("text", "markdown"):
        raise ValueError(f"unknown format {fmt!r}; use text, csv or markdown")
    # For people: each metric with its own fixed decimals (34.0 beside 33.5, not 34), other numbers to 4
    # significant digits (lr 0.005276, not 0.005276470510290681).
    for col in shown.columns:
        if pd.api.types.is_float_dtype(shown[col]):
            metric = describe_metric(col)
            shown[col] = [("-" if pd.isna(v) else f"{v:.{metric.digits}f}" if metric else f"{v:.4g}")
                          for v in shown[col]]
    if fmt == "markdown":
        from analysis.render import markdown_table

        return markdown_table(list(shown.columns), shown.itertuples(index=False))
    return shown.to_string(index=False)
