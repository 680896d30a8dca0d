"""Did the confirm stage train long enough? Each confirm run's validation curve, averaged over its seeds, and
whether it still rose at the end.

A curve counts as *still rising* when its seed-mean validation score peaked in the last quarter of training (at
least one epoch) and gained at least ``FLAT_GAIN`` (0.5 points x100) over it: a reviewer's test of "the curves
stop improving before training ends". A curve that peaked earlier and ends noisily higher than a quarter before
its end has stopped improving. With a schedule that decays the learning rate (cosine), a flat end says that more epochs
at this schedule's floor add little, not that a longer schedule could not help; the report says so.

Input: ``curves``, one row per (confirm run, epoch) with ``method``, ``config_rank``, ``seed``, ``epoch``,
``current_lr`` and the validation metrics (``study.records.confirm_history``); scores on the 0..1 scale.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from analysis import plots
from analysis.render import Block

FLAT_GAIN = 0.005  # 0.5 CIDEr-D points: below one seed's spread on Flickr8k's test split


def tail_epochs(epochs: int) -> int:
    """The epochs a curve's end is judged over: the last quarter of training, at least one."""
    return max(1, epochs // 4)


def length_table(curves: pd.DataFrame, metric: str = "val_CIDEr-D") -> pd.DataFrame:
    """One row per (method, config rank): ``seeds``, ``epochs``, the seed-mean curve's ``best_epoch`` and its
    value there (``best``), its value at the end (``last``), its ``gain`` over the last ``tail`` epochs and
    ``rising`` (best epoch within the tail and gain >= FLAT_GAIN). Only epochs every seed reached count (a seed
    still training is left out)."""
    rows = []
    for (method, rank), runs in curves.groupby(["method", "config_rank"], sort=False):
        epochs = int(runs.groupby("seed")["epoch"].max().min())
        mean = runs[runs["epoch"] <= epochs].groupby("epoch")[metric].mean().sort_index()
        if len(mean) < 2:
            continue
        tail = tail_epochs(epochs)
        gain = float(mean.iloc[-1] - mean.iloc[-1 - min(tail, len(mean) - 1)])
        rows.append({"method": method, "config_rank": int(rank), "seeds": int(runs["seed"].nunique()),
                     "epochs": epochs, "best_epoch": int(mean.idxmax()), "best": float(mean.max()),
                     "last": float(mean.iloc[-1]), "tail": tail, "gain": gain,
                     "rising": gain >= FLAT_GAIN and int(mean.idxmax()) > epochs - tail})
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame, metric: str = "val_CIDEr-D") -> str:
    """One sentence: which curves were still rising at the end, or that none was."""
    if table.empty:
        return "The confirm runs trained a single epoch or recorded no validation curve: there is no end to judge."
    rising = table[table["rising"]]
    spans = sorted({f"{t} epoch{'s' if t > 1 else ''}" for t in table["tail"]})
    if rising.empty:
        return (f"No method's seed-mean {metric} was still rising at the end (peak in its last {' / '.join(spans)} "
                f"and a gain of {FLAT_GAIN * 100:.1f} points or more over them): the confirm stage trained long "
                "enough for its schedule.")
    named = ", ".join(f"{r.method} (peak at epoch {r.best_epoch}, +{r.gain * 100:.1f} over its last {r.tail} "
                      f"epoch{'s' if r.tail > 1 else ''})"
                      for r in rising.itertuples())
    return (f"Still rising at the end of training: {named}. Their test scores understate what a longer schedule "
            "would reach; the others had stopped improving.")


def length_blocks(curves: pd.DataFrame, out_dir: Path, colors: Mapping[str, str] | None = None,
                  metric: str = "val_CIDEr-D") -> list[Block]:
    """The report's section: the sentence, the table (x100) and the figure."""
    if curves.empty:
        return []
    table = length_table(curves, metric)
    blocks: list[Block] = [("h2", "Did training run long enough?"), ("p", summary(table, metric))]
    if "current_lr" in curves:
        blocks.append(("p", "The learning rate decays over training (the study's schedule), so a flat end says "
                            "that more epochs at its floor add little, not that a longer schedule could not help."))
    if not table.empty:
        header = ["method", "rank", "seeds", "epochs", "best epoch", f"best {metric}", f"last {metric}",
                  "gain over the end", "still rising"]
        rows = [[r.method, r.config_rank, r.seeds, r.epochs, r.best_epoch, f"{r.best * 100:.1f}",
                 f"{r.last * 100:.1f}", f"{r.gain * 100:+.1f} (last {r.tail})", "yes" if r.rising else "no"]
                for r in table.itertuples()]
        blocks.append(("table", header, rows))
    blocks += chosen_blocks(curves, metric)
    figure = plots.plot_confirm_curves(curves, Path(out_dir) / "confirm_curves.png", metric, colors)
    if figure is not None:
        blocks.append(("img", figure, "confirm runs' validation curves"))
    return blocks


def chosen_table(curves: pd.DataFrame) -> pd.DataFrame:
    """One row per confirm run scored with a chosen epoch (``chosen`` marks it in ``curves``): ``run``, ``method``,
    ``seed``, ``chosen_epoch``, ``epochs`` trained and the validation metrics at the chosen epoch."""
    if "chosen" not in curves or not curves["chosen"].fillna(False).astype(bool).any():
        return pd.DataFrame()
    trained = curves.groupby("run")["epoch"].max().rename("epochs")
    chosen = curves[curves["chosen"].fillna(False).astype(bool)].rename(columns={"epoch": "chosen_epoch"})
    return chosen.join(trained, on="run").sort_values(["method", "seed"], kind="stable")


def chosen_blocks(curves: pd.DataFrame, metric: str) -> list[Block]:
    """Which epoch's model each confirm run was scored with (the best on validation, chosen before the test split
    was read), and where that fell in its schedule."""
    table = chosen_table(curves)
    if table.empty:
        return []
    early = table[table["chosen_epoch"] < table["epochs"]]
    text = (f"Each confirm run was scored with the model of its best validation epoch ({metric}, chosen before the "
            f"test split was read): {len(early)} of {len(table)} runs chose an epoch before their last.")
    rows = [[r["method"], r["seed"], f"{r['chosen_epoch']} of {r['epochs']}", f"{r[metric] * 100:.1f}"]
            for _, r in table.iterrows()]
    return [("p", text), ("table", ["method", "seed", "chosen epoch", f"{metric} there"], rows)]
