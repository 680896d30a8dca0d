"""Every metric the project reports, in one table: which way is better, and how a person reads it.

One scale for every score anyone reads: **points**, pycocoevalcap's 0..1 scale x100, as papers print them
(CIDEr-D 0.4567 is 45.67 points). The console, the report and the Markdown tables print points with one decimal
(45.7); the ``study.load`` frames, every CSV of ``study export``, MLflow and the exported ``optuna.db`` hold the
same points at full precision (``in_points``). A difference of two scores and a margin on one are points too.
Losses and bits per character are as they are, with three decimals. Only a study's own files (a trial's
``history.json``, the confirm records, the tracking journal, the test-split ledger) and the analysis underneath
keep the 0..1 scale the metrics library computes, so no study written before points were adopted reads wrong.

The spec's checks (``study.spec``), the metric suite (``study.trial.metrics``), the confirm stage, the leaderboard,
the verdict (``analysis.verdict``), the corpus table (``analysis.scores``) and the report all read this table.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Metric:
    """How a metric reads: which way is better, and how it is printed."""

    mode: Literal["max", "min"]
    scale: int = 1  # caption scores are computed on pycocoevalcap's 0..1 scale and read in points (x100)
    digits: int = 3  # decimals printed, after scaling

    def shown(self, value: Any) -> Any:
        """``value`` as printed, still a number (a float, or a pandas Series): scaled and rounded."""
        return round(value * self.scale, self.digits)


SCORE, LOSS = Metric("max", scale=100, digits=1), Metric("min")

# The test suite's scores in the order papers print them (coco-caption's names). SPICE is in the suite but NaN
# here (its jar downloads Stanford CoreNLP at run time), so the corpus tables leave it out.
SUITE = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE")
CORPUS_METRICS = SUITE[:-1]
# The scores computed every validation epoch (pycocoevalcap's Bleu and Cider, no Java); the rest need Java.
FAST_SUITE = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D")
# Scores kept per test image (for the verdict's paired bootstrap and the galleries).
PER_IMAGE = ("CIDEr-D", "BLEU-4", "METEOR", "ROUGE-L")
# Of those, the ones whose corpus score *is* the mean over images, so a bootstrap over images is a bootstrap of
# the corpus score: the verdict compares these (BLEU and METEOR pool their statistics over the set first).
MEAN_OVER_IMAGES = ("CIDEr-D", "ROUGE-L")

# Every metric by name: the per-epoch ones (their names as Tune and MLflow carry them) and the suite's scores
# (a ``test_`` or ``val_`` prefix reads the same, see ``describe_metric``).
METRICS: dict[str, Metric] = {
    "val_CIDEr-D": SCORE, "val_BLEU-4": SCORE, "val_loss": LOSS, "val_bpc": LOSS, "train_loss": LOSS,
    **{name: SCORE for name in SUITE},
}


def describe_metric(name: str) -> Metric | None:
    """The table's entry for ``name`` (``test_CIDEr-D`` reads as ``CIDEr-D``), or None for a non-metric."""
    if name in METRICS:
        return METRICS[name]
    prefix, _, rest = name.partition("_")
    return METRICS.get(rest) if prefix in ("test", "val") else None


def lower_is_better(name: str) -> bool:
    """Losses and bits per character are minimised, caption scores maximised (a name not in the table reads as
    a loss when it says so)."""
    metric = describe_metric(name)
    if metric is not None:
        return metric.mode == "min"
    lowered = name.lower()
    return "loss" in lowered or "bpc" in lowered or "perplexity" in lowered


def format_metric(name: str, value: Any, missing: str = "-") -> str:
    """``value`` of metric ``name`` as every table prints it: scores x100 with one decimal (``0.4567`` ->
    ``45.7``), losses and bits per character with three, anything else to 4 significant digits; ``missing`` for
    a missing (non-numeric or NaN) value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:  # numpy scalars are Real
        return missing
    metric = describe_metric(name)
    if metric is None:
        return f"{value:.4g}"
    return f"{value * metric.scale:.{metric.digits}f}"


POINTS = 100  # a caption score in points: pycocoevalcap's 0..1 score x100
# Columns (and MLflow metrics) of the verdict tables that hold a difference of two scores, its interval and
# standard error, or a margin on a score: points too.
DIFFERENCES = frozenset({"diff", "lo", "hi", "se", "margin", "ci_low", "ci_high"})
_STATISTICS = ("_lo", "_hi", "_mean", "_std")  # CIDEr-D_lo, CIDEr-D_mean: a statistic of a score is a score


def is_score(name: str) -> bool:
    """Whether the column or MLflow metric ``name`` holds a caption score (so reads in points): ``CIDEr-D``,
    ``val_CIDEr-D``, ``best_val_CIDEr-D``, ``test_CIDEr-D.init``, ``coco-mini/CIDEr-D``, ``CIDEr-D_lo``,
    ``BLEU-4_mean``, a difference (``diff``, ``verdict.ci_low``); not a loss, a count or a time."""
    base = name.rsplit("/", 1)[-1].removeprefix("verdict.")  # coco-mini/CIDEr-D, verdict.diff
    if base in DIFFERENCES:
        return True
    base = base.split(".", 1)[0].removeprefix("best_")  # test_CIDEr-D.init: the score of arm init
    for suffix in _STATISTICS:
        base = base.removesuffix(suffix)
    metric = describe_metric(base)
    return metric is not None and metric.scale != 1


def in_points(frame: "pd.DataFrame") -> "pd.DataFrame":
    """A copy of ``frame`` with every score column (``is_score``) x100, and the score ``attrs`` a verdict frame
    carries (``diff``, ``ci``, ``margin``) too."""
    out = frame.copy()
    for column in out.columns:
        if isinstance(column, str) and is_score(column) and _numeric(out[column]):
            out[column] = out[column] * POINTS
    for key in ("diff", "margin"):
        if key in out.attrs and isinstance(out.attrs[key], numbers.Real):
            out.attrs[key] = out.attrs[key] * POINTS
    if isinstance(out.attrs.get("ci"), (tuple, list)):
        out.attrs["ci"] = tuple(v * POINTS for v in out.attrs["ci"])
    return out


def from_points(frame: "pd.DataFrame") -> "pd.DataFrame":
    """``in_points`` undone: what an export holds back on the 0..1 scale the analysis computes on."""
    out = frame.copy()
    for column in out.columns:
        if isinstance(column, str) and is_score(column) and _numeric(out[column]):
            out[column] = out[column] / POINTS
    return out


def _numeric(values) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
