"""What each varied hyperparameter did to the metric, from the search's trial table.

* Importance: Optuna's fANOVA over the trials (an Optuna study is rebuilt from the table's rows with
  ``optuna.trial.create_trial``), so the numbers mean "share of the metric's variance this parameter
  explains". It needs at least two trials with a value and one parameter that varies; otherwise the result
  says why there is none.
* Per-value summaries of every categorical parameter (count, mean, median, best).
* Explicit answers to the study's side questions: char vs word tokens, LSTM vs GRU vs peephole LSTM.
* Edge warnings (Google's tuning playbook): the best trial's value of a numeric parameter within 10% of
  either end of its range (log scale for loguniform) means the range may have cut off the optimum. Checked
  for the overall best trial and each injection method's best (the confirm stage retrains those).

Inputs: ``trials`` has one row per trial with the varied parameters as columns, ``status``
('completed' | 'stopped' | 'errored') and the metric (best-epoch value). ``space`` is
``StudySpec.space_description()``: ``{name: {"type": "choice", "values": [...]}`` or
``{"type": "uniform"|"loguniform"|"int"|"quniform", "low": .., "high": .., "step"?: ..}}``.
ASHA-stopped trials are included by default: their best value over fewer epochs is what the search saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
import pandas as pd

from analysis.grouping import group_column
from analysis.metric_table import lower_is_better

NUMERIC_TYPES = ("uniform", "loguniform", "int", "quniform")
EDGE_FRACTION = 0.10
# Side questions of the seed project, with the words used for each value.
QUESTIONS = {
    "tokens": ("char vs word", {"word": "word-level", "char": "character-level"}),
    "cell": ("LSTM vs GRU vs peephole LSTM", {"lstm": "LSTM (fused)", "gru": "GRU (fused)",
                                              "lstm_peephole": "peephole LSTM"}),
}


@dataclass
class EdgeWarning:
    """Best trials whose numeric parameter sits within 10% of one end of the searched range.

    ``cases`` lists (scope, value): scope "overall" is the best trial of the search, any other scope names the
    injection method whose best trial it is. One warning per (parameter, side) keeps the report short.
    """

    param: str
    low: float
    high: float
    side: str  # "low" | "high"
    log: bool
    cases: list[tuple[str, float]]

    @property
    def message(self) -> str:
        who = ", ".join(("the best trial" if scope == "overall" else f"best {scope}") + f" ({value:.4g})"
                        for scope, value in self.cases)
        scale = " (log scale)" if self.log else ""
        return (f"{self.param} sits at the {self.side} edge of its range [{self.low:.4g}, {self.high:.4g}]"
                f"{scale} for {who}: the optimum may lie outside; widen that end if it can be widened.")


@dataclass
class Effects:
    metric: str
    n_trials: int  # trials with a finite metric value that entered the analysis
    importances: dict[str, float]  # fANOVA share of variance, sums to 1, most important first; {} if none
    categorical: dict[str, pd.DataFrame]  # param -> per-value table (index value; count, mean, median, best)
    answers: dict[str, str]  # "char vs word" / "LSTM vs GRU vs peephole LSTM" -> a sentence
    edge_warnings: list[EdgeWarning]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "n_trials": self.n_trials,
                **{f"importance.{k}": v for k, v in self.importances.items()},
                "answers": dict(self.answers), "edge_warnings": [w.message for w in self.edge_warnings]}


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars (Optuna's categorical choices must be plain)."""
    return value.item() if isinstance(value, np.generic) else value


def varied_params(trials: pd.DataFrame, space: dict[str, dict] | None) -> list[str]:
    """Parameters of the space that the table has and that took more than one value."""
    names = list(space or {})
    return [p for p in names if p in trials.columns and trials[p].dropna().nunique() > 1]


def _distribution(name: str, desc: dict, column: pd.Series) -> optuna.distributions.BaseDistribution:
    kind = desc.get("type")
    if kind == "choice":
        values = [_plain(v) for v in desc["values"]]
        # Rows may hold values the spec no longer lists (an edited spec): keep them rather than fail.
        values += [v for v in (_plain(x) for x in column.dropna().unique()) if v not in values]
        return optuna.distributions.CategoricalDistribution(values)
    low = min(float(desc["low"]), float(column.min()))
    high = max(float(desc["high"]), float(column.max()))
    if kind == "loguniform":
        return optuna.distributions.FloatDistribution(low, high, log=True)
    if kind == "int":
        return optuna.distributions.IntDistribution(int(low), int(high))
    if kind in ("uniform", "quniform"):
        # quniform's step grid is a sampling detail; fANOVA only needs the range.
        return optuna.distributions.FloatDistribution(low, high)
    raise ValueError(f"space entry {name!r}: unknown type {kind!r}; expected choice or one of {NUMERIC_TYPES}")


def param_importances(trials: pd.DataFrame, space: dict[str, dict], metric: str, *,
                      seed: int = 0) -> tuple[dict[str, float], str | None]:
    """fANOVA importances of the varied parameters, or ({}, reason) when they cannot be computed."""
    usable = trials[np.isfinite(trials[metric].astype(float))]
    params = varied_params(usable, space)
    if len(usable) < 2:
        return {}, f"importance needs at least 2 trials with a {metric} value; there are {len(usable)}"
    if not params:
        return {}, "no searched parameter took more than one value, so none can explain the metric"
    dists = {p: _distribution(p, space[p], usable[p]) for p in params}
    direction = "minimize" if lower_is_better(metric) else "maximize"
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" per report
    study = optuna.create_study(direction=direction)
    for _, row in usable.iterrows():
        # Conditional parameters may be absent (NaN) in some rows; int columns come back as floats next to NaN.
        present = {p: int(row[p]) if space[p]["type"] == "int" else _plain(row[p])
                   for p in params if not pd.isna(row[p])}
        study.add_trial(optuna.trial.create_trial(params=present, distributions={p: dists[p] for p in present},
                                                  value=float(row[metric])))
    # Optuna only scores parameters present in every trial; conditional ones (attention_dim) drop out.
    common = [p for p in params if usable[p].notna().all()]
    if not common:
        return {}, "every varied parameter is conditional (absent in some trials), so none can be ranked"
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    imp = optuna.importance.get_param_importances(study, evaluator=evaluator, params=common)
    dropped = [p for p in params if p not in common]
    note = f"conditional parameters left out of the importance: {', '.join(dropped)}" if dropped else None
    return {k: float(v) for k, v in imp.items()}, note


def categorical_summary(trials: pd.DataFrame, param: str, metric: str) -> pd.DataFrame:
    """Per-value count, mean, median and best of ``metric`` (best = max, or min for losses)."""
    best = "min" if lower_is_better(metric) else "max"
    rows = trials[trials[param].notna() & np.isfinite(trials[metric].astype(float))]
    table = rows.groupby(param)[metric].agg(count="count", mean="mean", median="median", best=best)
    return table.sort_values("mean", ascending=lower_is_better(metric))


def _answer(question: str, words: dict[str, str], table: pd.DataFrame, metric: str, scale: float) -> str:
    parts = []
    for value, row in table.iterrows():
        parts.append(f"{words.get(value, value)}: {int(row['count'])} trials, mean {row['mean'] * scale:.1f}, "
                     f"best {row['best'] * scale:.1f}")
    missing = [w for v, w in words.items() if v not in table.index]
    s = f"{question} ({metric}{' x100' if scale == 100 else ''}): " + "; ".join(parts) + "."
    if len(table) >= 2:
        lead_mean = table.index[0]  # sorted best mean first
        by_best = table["best"].idxmin() if lower_is_better(metric) else table["best"].idxmax()
        s += f" {words.get(lead_mean, lead_mean)} is ahead on the mean"
        s += (" and on the best trial." if by_best == lead_mean
              else f", {words.get(by_best, by_best)} on the best trial.")
        if table["count"].min() < 3:
            s += " Few trials for some value: read this as a hint, not a result."
    if missing:
        s += f" Not searched: {', '.join(missing)}."
    return s


def edge_warnings(trials: pd.DataFrame, space: dict[str, dict] | None, metric: str,
                  by: str | None = "inject") -> list[EdgeWarning]:
    """Warnings for numeric parameters of the best trial (and of each ``by`` group's best) near a range end."""
    usable = trials[np.isfinite(trials[metric].astype(float))] if metric in trials else trials.iloc[:0]
    if usable.empty or not space:
        return []
    pick = usable[metric].idxmin if lower_is_better(metric) else usable[metric].idxmax
    scopes = [("overall", usable.loc[pick()])]
    if by and by in usable and usable[by].nunique() > 1:
        for group, rows in usable.groupby(by):
            best = rows[metric].idxmin() if lower_is_better(metric) else rows[metric].idxmax()
            scopes.append((str(group), rows.loc[best]))
    out = []
    for name, desc in space.items():
        if desc.get("type") not in NUMERIC_TYPES or name not in usable:
            continue
        low, high, log = float(desc["low"]), float(desc["high"]), desc["type"] == "loguniform"
        sides: dict[str, list[tuple[str, float]]] = {"low": [], "high": []}
        for scope, row in scopes:
            if pd.isna(row[name]):
                continue  # a conditional parameter this trial did not have
            value = float(row[name])
            if log:
                pos = (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
            else:
                pos = (value - low) / (high - low)
            if pos <= EDGE_FRACTION:
                sides["low"].append((scope, value))
            elif pos >= 1 - EDGE_FRACTION:
                sides["high"].append((scope, value))
        out += [EdgeWarning(name, low, high, side, log, cases) for side, cases in sides.items() if cases]
    return out


def compute_effects(trials: pd.DataFrame, space: dict[str, dict] | None, *, metric: str = "val_CIDEr-D",
                    statuses: tuple[str, ...] = ("completed", "stopped"), seed: int = 0) -> Effects:
    """Importances, categorical summaries, the side questions' answers and edge warnings for ``metric``."""
    notes: list[str] = []
    if trials is None or trials.empty or metric not in trials:
        why = "no trials" if trials is None or trials.empty else f"the trial table has no {metric!r} column"
        return Effects(metric, 0, {}, {}, {}, [], [f"No effects: {why}."])
    rows = trials[trials["status"].isin(statuses)] if "status" in trials else trials
    rows = rows[np.isfinite(rows[metric].astype(float))]
    space = dict(space or {})
    # Parameters varied in the table but absent from the space (e.g. a hand-edited table): infer a kind.
    for col in ("inject", "cell", "tokens"):
        if col not in space and col in rows and rows[col].nunique() > 1:
            space[col] = {"type": "choice", "values": sorted(rows[col].dropna().unique().tolist())}

    importances, note = param_importances(rows, space, metric, seed=seed) if not rows.empty else ({}, None)
    if rows.empty:
        notes.append(f"No trial with status in {list(statuses)} has a {metric} value.")
    if note:
        notes.append(note)
    scale = 1.0 if lower_is_better(metric) else 100.0
    categorical = {p: categorical_summary(rows, p, metric) for p in varied_params(rows, space)
                   if space[p].get("type") == "choice"}
    answers = {}
    for param, (question, words) in QUESTIONS.items():
        if param in categorical:
            answers[question] = _answer(question, words, categorical[param], metric, scale)
            if param == "tokens" and "val_bpc" in rows:
                # Bits per character compare char and word models on one scale (the seed's measure).
                bpc = rows.groupby("tokens")["val_bpc"].min()
                answers[question] += " Best val bits per character (lower is better): " + ", ".join(
                    f"{words.get(v, v)} {b:.3f}" for v, b in bpc.sort_values().items()) + "."
        elif param in rows and rows[param].nunique() == 1:
            answers[question] = f"{question}: not varied (every trial used {rows[param].iloc[0]})."
        else:
            answers[question] = f"{question}: not in this study's trials."
    return Effects(metric, len(rows), importances, categorical, answers, 
                   edge_warnings(rows, space, metric, by=group_column(rows)), notes)
