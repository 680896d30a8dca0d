"""Which epoch's model a run ends with: one rule for every arm, decided on validation alone.

``run_trial`` asks :class:`BestEpoch` after each epoch whether the epoch's validation score (``select_metric``:
the study's metric, decoded as the test is decoded in a confirm run) is the best so far; if so its checkpoint is kept
in ``work_dir/best``, and the run ends with those weights. The test split is never read before the run returns, so
it cannot influence the choice (tests/test_protocol.py swaps it and gets the same epoch and weights).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from analysis.metric_table import METRICS


class BestEpoch:
    """Which epoch's model a run ends with: the best by ``metric`` (its folder holds that epoch's checkpoint), or,
    with no metric, the last. Validation alone decides: the test split is never read before the run ends."""

    def __init__(self, metric: str | None, folder: Path):
        self.metric, self.folder = metric, folder
        self.mode = METRICS[metric].mode if metric else "max"
        self.epoch: int | None = None
        self.value: float | None = None

    def improved(self, metrics: dict[str, Any]) -> bool:
        if self.metric is None:
            return False
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return False
        if self.value is not None and not (value > self.value if self.mode == "max" else value < self.value):
            return False  # ties keep the earlier epoch: less training for the same score
        self.epoch, self.value = int(metrics["epoch"]), float(value)
        return True

    def summary(self, history: list[dict[str, Any]], planned: int) -> dict[str, Any]:
        """The chosen epoch, by what, and why training stopped (for the report and the exports)."""
        trained = int(history[-1]["epoch"]) if history else 0
        return {"rule": "best_val" if self.metric else "last", "metric": self.metric,
                "chosen_epoch": self.epoch if self.epoch is not None else trained,
                "chosen_value": self.value, "trained_epochs": trained, "planned_epochs": planned,
                "stopped": "schedule end" if trained >= planned else "stopped early"}


def kept_checkpoint_dir(work_dir: Path, select_metric: str | None) -> Path:
    """The folder of the checkpoint a finished ``run_trial`` ended with: its chosen epoch's (``best``) when it
    selects on validation, else its last epoch's (``checkpoint``)."""
    return Path(work_dir) / ("best" if select_metric else "checkpoint")
