"""The leaderboard: trials of a study read back from MLflow into a pandas table."""

from __future__ import annotations

import pandas as pd

from study.tracking import study_runs

COLUMNS = ["run", "inject", "cell", "layers", "hidden", "tokens", "lr", "dropout", "status", "epochs",
           "val_CIDEr-D", "val_BLEU-4", "val_bpc", "val_loss"]


def trials_frame(uri: str, experiment: str) -> pd.DataFrame:
    """One row per trial run: params, final metrics (best epoch's for CIDEr-D/BLEU-4 is not kept by MLflow,
    so the last reported values) and status."""
    _, runs = study_runs(uri, experiment)
    if runs.empty:
        return pd.DataFrame(columns=COLUMNS)
    frame = pd.DataFrame({
        "run": runs["tags.mlflow.runName"],
        "trial_id": runs.get("tags.trial_id"),
        "status": runs.get("tags.status", pd.Series(["running"] * len(runs), index=runs.index)).fillna("running"),
        "mlflow_status": runs["status"],
    })
    for col in runs.columns:
        if col.startswith("params."):
            frame[col[len("params."):]] = runs[col]
        elif col.startswith("metrics.") and col[len("metrics."):] not in frame:  # params win a name clash
            frame[col[len("metrics."):]] = runs[col]
    for name in ("layers", "hidden", "embed", "lr", "dropout", "weight_decay", "attention_dim"):
        if name in frame:
            frame[name] = pd.to_numeric(frame[name], errors="coerce")
    if "epoch" in frame:
        frame["epochs"] = frame["epoch"]
    return frame.reset_index(drop=True)


def leaderboard(uri: str, experiment: str, *, metric: str = "val_CIDEr-D", mode: str = "max",
                best_per_method: bool = True) -> pd.DataFrame:
    """Best trial of each injection method (and the overall best first), sorted by ``metric``."""
    frame = trials_frame(uri, experiment)
    if frame.empty or metric not in frame:
        return frame
    ascending = mode == "min"
    frame = frame.sort_values(metric, ascending=ascending, na_position="last")
    if best_per_method and "inject" in frame:
        frame = frame.groupby("inject", sort=False).head(1)
    cols = [c for c in COLUMNS if c in frame] + [metric] * (metric not in COLUMNS)
    return frame[cols].reset_index(drop=True)


def format_table(frame: pd.DataFrame, fmt: str = "text") -> str:
    if frame.empty:
        return "(no trials yet)"
    shown = frame.copy()
    for col in shown.columns:
        if col.startswith("val_CIDEr") or col.startswith("val_BLEU"):
            shown[col] = (100 * shown[col]).round(1)  # papers report x100
    if fmt == "csv":
        return shown.to_csv(index=False)
    if fmt == "markdown":
        return shown.to_markdown(index=False) if _has_tabulate() else _markdown(shown)
    if fmt != "text":
        raise ValueError(f"unknown format {fmt!r}; use text, csv or markdown")
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def _markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])
