"""Every metric the project reports, in one table: which way is better, and how a person reads it.

The display rule, everywhere a person reads a score (the CLI, the report, the Markdown tables, the README):
caption scores x100 with one decimal, as papers print them (CIDEr-D 0.4567 reads 45.7); losses and bits per
character as they are, with three decimals. The numbers underneath stay on pycocoevalcap's 0..1 scale in the
files machines read (``study.load`` frames, the exported CSVs, MLflow), and those say so in their docs.

The spec's checks (``study.spec``), the metric suite (``study.metrics``), the confirm stage, the leaderboard,
the verdict (``analysis.verdict``), the corpus table (``analysis.scores``) and the report all read this table.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Metric:
    """How a metric reads: which way is better, and how it is printed."""

    mode: Literal["max", "min"]
    scale: int = 1  # caption scores are on pycocoevalcap's 0..1 scale; papers, and every table here, print x100
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
