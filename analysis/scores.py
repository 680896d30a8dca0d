"""Test scores as papers print them: each run's corpus-level score, mean and standard deviation over seeds.

BLEU and METEOR are corpus statistics: coco-caption pools n-gram counts (BLEU) or alignment statistics
(METEOR) over the whole test set before taking one score, so the mean of the per-image (sentence-level) scores
is a different, much lower number (on Flickr8k test: sentence BLEU-4 averages 10.9 where the corpus BLEU-4 of
the same captions is 20.8). The verdict's bootstrap resamples images, so it only uses metrics whose corpus
score *is* the mean over images (``analysis.metric_table.MEAN_OVER_IMAGES``); this table is where every metric is
printed the way the literature reports it. Pure: a frame in, a frame out.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from analysis.metric_table import CORPUS_METRICS, format_metric


def corpus_scores(runs: pd.DataFrame, order: Sequence[str] = ()) -> pd.DataFrame:
    """One row per method and configuration rank: ``method, config_rank, seeds`` and ``<metric>_mean``,
    ``<metric>_std`` (0..1 scale; std over seeds, NaN for one seed) for every metric in ``CORPUS_METRICS`` that
    ``runs`` has. ``runs``: one row per confirm run with ``method, config_rank`` and each run's corpus scores.
    Methods in ``order`` come first, in that order; others follow alphabetically."""
    metrics = [m for m in CORPUS_METRICS if m in runs.columns]
    if runs.empty or not metrics:
        return pd.DataFrame(columns=["method", "config_rank", "seeds"])
    runs = runs if "config_rank" in runs else runs.assign(config_rank=1)
    rank = {m: i for i, m in enumerate(order)}
    runs = runs.sort_values(["method", "config_rank"],
                            key=lambda c: c.map(lambda m: (rank.get(m, len(rank)), m)) if c.name == "method" else c)
    grouped = runs.groupby(["method", "config_rank"], sort=False)
    table = grouped[metrics].agg(["mean", "std"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    return grouped.size().rename("seeds").to_frame().join(table).reset_index()


def x100(value: float | None) -> str:
    """A 0..1 score as papers print it: x100, one decimal; ``n/a`` when missing."""
    return format_metric("CIDEr-D", value, missing="n/a")  # every score prints as CIDEr-D does


def corpus_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """``corpus_scores`` for display: a header and rows of ``mean ± sd`` x100 (one decimal, as papers print)."""
    metrics = [m for m in CORPUS_METRICS if f"{m}_mean" in table]
    rows = []
    for _, row in table.iterrows():
        name = str(row["method"]) + (f" (rank {row['config_rank']})" if row["config_rank"] != 1 else "")
        rows.append([name, str(row["seeds"]), *[_mean_sd(row[f"{m}_mean"], row[f"{m}_std"]) for m in metrics]])
    return ["method", "seeds", *metrics], rows


def _mean_sd(mean: float, sd: float) -> str:
    return x100(mean) + ("" if pd.isna(mean) or pd.isna(sd) else f" ± {x100(sd)}")
