"""A pooled verdict over several test sets: one interval for ``target - comparator`` from every set at once.

Input: one per-image frame per test set (the study's own test split, and every other photo collection the
confirm runs were scored on, ``study evaluate``), each as ``analysis.verdict.compute_verdict`` takes it:
``method, config_rank, seed, image_id`` and the metric (0..1). The same confirm runs (checkpoints) score every
set, so the sets share their seeds and differ in their images.

The method (fixed-effect inverse-variance pooling, with one joint bootstrap):

* one bootstrap resample draws, for each method, its seeds once (the same draw for every set: a lucky seed is
  lucky on every set), and, for each set on its own, that set's images (paired across methods within the set).
  These are the very resamples of each set's own verdict (``analysis.bootstrap`` keys them by set and method):
  a set's row here shows the interval its verdict and its "target minus each method" table show;
* each set k gives the resampled difference ``d_k = mean(target) - mean(other)`` over its images and seeds;
* each set is weighted by the inverse of the variance of its ``d_k`` over the resamples, ``w_k = 1 / var(d_k)``,
  and the pooled difference is ``sum_k w_k d_k / sum_k w_k``, the weights held fixed across resamples. Its
  interval is the percentile interval of that pooled difference over the resamples. When the sets agree it is
  narrower than any one set's (the standard error of an inverse-variance mean is ``1 / sqrt(sum_k w_k)``,
  where sets are independent; shared seeds make them partly dependent, and the joint resampling keeps that);
* a set whose difference does not vary over the resamples (every caption of both methods scores the same on
  every image there, e.g. 0 for a model that cannot describe those photos) has no variance to weigh by; it gets
  no weight (noted in the text) instead of all of it;
* a set with almost all the weight (90% or more) is named in the text: the pooled interval is then that set's;
* the compared method is one arm on every set: the comparator fixed before any test split was scored (the best
  other arm on validation) when the caller gives one, else the best competitor on the first (primary) set's
  test means, which the text says;
* whether the sets agree is Cochran's Q, ``sum_k w_k (d_k - pooled)^2``, against chi-square with K-1 degrees of
  freedom. Pooling assumes one common difference: when the sets disagree (p below ``alpha``), the pooled
  interval is not taken as evidence. The pooled word is then the sets' common word when every set decides the
  same way on its own, and otherwise "inconclusive", with the text saying that the answer depends on the photo
  collection.

The words follow ``analysis.verdict``: "competes" when the whole interval lies above ``-margin``, "does not
compete" when it lies below, else "inconclusive".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.bootstrap import interval as _interval
from analysis.margins import COMPETES, DOES_NOT_COMPETE, INCONCLUSIVE, NOT_AVAILABLE, margin_table, word
from analysis.scores import x100
from analysis.verdict import PRIMARY, Verdict, _split_roles, compute_verdict

SET_COLUMNS = ["images", "seeds", "diff", "lo", "hi", "se", "weight", "verdict"]


@dataclass
class PooledVerdict:
    """``sets``: one row per test set (index ``set``): ``images``, ``seeds`` (of the two compared methods, the
    fewer), ``diff`` (target - other) with its ``lo``, ``hi`` interval and standard error ``se`` from the joint
    bootstrap, its pooling ``weight`` (sums to 1) and the set's own ``verdict`` word at the margin."""

    verdict: str
    target: str
    other: str | None
    diff: float
    ci: tuple[float, float]
    margin: float
    level: float
    metric: str
    sets: pd.DataFrame
    q: float = math.nan  # Cochran's Q
    q_p: float = math.nan  # its chi-square p-value (K-1 degrees of freedom)
    disagree: bool = False  # whether the sets disagree (q_p < alpha): the pooled interval is then not evidence
    text: str = ""
    n_boot: int = 0
    boot: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)  # (B,) pooled differences
    notes: list[str] = field(default_factory=list)
    # The pooled words at margins of 1, 2, 3 points and 4% of the comparator's score (``analysis.margins``).
    margins: pd.DataFrame = field(default_factory=lambda: margin_table(math.nan, (math.nan, math.nan), math.nan))
    comparator_fixed: bool = False  # whether ``other`` was fixed before the test splits were scored

    @property
    def decides(self) -> bool:
        return self.verdict in (COMPETES, DOES_NOT_COMPETE)


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for X chi-square with ``dof`` (a positive integer) degrees of freedom (no scipy needed)."""
    if dof < 1:
        raise ValueError(f"dof must be >= 1, got {dof}")
    if x <= 0:
        return 1.0
    half = x / 2.0
    if dof % 2 == 0:  # exp(-x/2) * sum_{i < dof/2} (x/2)^i / i!
        term, total = 1.0, 1.0
        for i in range(1, dof // 2):
            term *= half / i
            total += term
        return min(1.0, math.exp(-half) * total)
    total = math.erfc(math.sqrt(half))  # dof 1; each further 2 degrees add (x/2)^(k/2) e^(-x/2) / Gamma(k/2 + 1)
    for k in range(1, dof - 1, 2):
        total += math.exp((k / 2) * math.log(half) - half - math.lgamma(k / 2 + 1))
    return min(1.0, total)


def pooled_verdict(sets: Mapping[str, pd.DataFrame], *, roles: Mapping[str, str], margin: float,
                   metric: str = PRIMARY, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                   alpha: float = 0.05, comparator: str | None = None) -> PooledVerdict:
    """Pool ``target - comparator`` over the test sets (``{set name: per-image frame}``, in display order, the
    study's own test split first: the primary set); see the module docstring for the method. ``comparator``: the
    arm fixed before any test split was scored; None: the best competitor on the primary set's test means (said
    in the text). Each set's resamples, means and interval are its own verdict's (``compute_verdict`` with the
    set's name), so a set's row shows the interval its verdict and its pairwise table show. Deterministic given
    ``seed``. A set without the target or the comparator is left out (noted)."""
    target, _, _ = _split_roles(roles)
    notes: list[str] = []
    verdicts = {name: compute_verdict(frame, roles=roles, margin=margin, metric=metric, n_boot=n_boot, seed=seed,
                                      level=level, comparator=comparator, set_name=name)
                for name, frame in sets.items() if frame is not None and not frame.empty and metric in frame}
    notes += [f"{name} has no per-image {metric}: left out." for name in sets if name not in verdicts]
    primary = next(iter(sets), None)
    other = comparator if comparator is not None else (
        verdicts[primary].best_other if primary in verdicts else None)
    if other is None:
        return _not_available(target, margin, level, metric, notes,
                              f"The primary test set ({primary}) holds no target and competitor to compare: nothing "
                              "to pool.")
    if comparator is None:
        notes.append(f"No comparator was fixed before the test splits were scored, so {other}, the best competitor "
                     f"on the primary set's ({primary}) test scores, is compared on every set.")
    usable = {k: v for k, v in verdicts.items() if {target, other} <= set(v.samples)
              and not math.isnan(v.table.loc[target, metric]) and not math.isnan(v.table.loc[other, metric])}
    notes += [f"{k} lacks {target} or {other}: left out." for k in verdicts if k not in usable]
    if not usable:
        return _not_available(target, margin, level, metric, notes, f"No test set holds both {target} and {other}: "
                              "nothing to pool.")
    means = {k: {m: float(v.table.loc[m, metric]) for m in (target, other)} for k, v in usable.items()}
    boots = {k: {m: v.samples[m] for m in (target, other)} for k, v in usable.items()}
    diff, pooled, diffs, weights, samples = _pool(means, boots, target, other)
    notes += _weight_notes(weights, target, other) + _seed_notes(usable, target, other)
    ci = _interval(pooled, level)
    table = pd.DataFrame([_set_row(k, v, target, other, diffs[k], samples[k], weights[k], level, margin)
                          for k, v in usable.items()]).set_index("set")
    q, q_p, weighed = _cochran_q(table, diff)
    disagree = bool(q_p < alpha)
    judge = _judge(table.loc[weighed] if weighed else table, disagree)
    verdict = judge(ci, margin)
    score = sum(weights[k] * means[k][other] for k in usable)  # the comparator's score, pooled with the same weights
    text = _text(verdict, target, other, diff, ci, table, margin, level, metric, q, q_p, disagree, alpha)
    return PooledVerdict(verdict, target, other, diff, ci, margin, level, metric, table, q, q_p, disagree,
                         text + (" " + " ".join(notes) if notes else ""), n_boot, pooled, notes,
                         margin_table(diff, ci, score, margin, judge=judge), comparator is not None)


def _set_row(name: str, verdict: Verdict, target: str, other: str, diff: float, samples: np.ndarray, weight: float,
             level: float, margin: float) -> dict:
    lo, hi = _interval(samples, level)
    return {"set": name, "images": int(verdict.table.loc[target, "images"]),
            "seeds": int(min(verdict.table.loc[target, "seeds"], verdict.table.loc[other, "seeds"])),
            "diff": diff, "lo": lo, "hi": hi, "se": float(np.nanstd(samples)), "weight": weight,
            "verdict": word((lo, hi), margin)}


def _judge(sets: pd.DataFrame, disagree: bool):
    """The pooled word at a margin: the pooled interval's, unless the sets disagree; then the sets' common word
    when every weighed set decides the same way at that margin on its own, else inconclusive."""
    def judge(ci: tuple[float, float], margin: float) -> str:
        if not disagree:
            return word(ci, margin)
        words = {word((r["lo"], r["hi"]), margin) for _, r in sets.iterrows()}
        return words.pop() if len(words) == 1 and words <= {COMPETES, DOES_NOT_COMPETE} else INCONCLUSIVE
    return judge


def _not_available(target: str, margin: float, level: float, metric: str, notes: list[str],
                   text: str) -> PooledVerdict:
    empty = pd.DataFrame(columns=SET_COLUMNS).rename_axis("set")
    return PooledVerdict(NOT_AVAILABLE, target, None, math.nan, (math.nan, math.nan), margin, level, metric, empty,
                         text=" ".join([text, *notes]), notes=notes)


def _seed_notes(verdicts: Mapping[str, Verdict], target: str, other: str) -> list[str]:
    counts = {k: (int(v.table.loc[target, "seeds"]), int(v.table.loc[other, "seeds"])) for k, v in verdicts.items()}
    if len(set(counts.values())) <= 1:
        return []
    return [f"The sets hold different numbers of seeds ({target}, {other}: "
            + ", ".join(f"{k} {a}, {b}" for k, (a, b) in counts.items())
            + "), so their seed resamples are drawn apart, not shared."]


def _pool(means: dict[str, dict[str, float]], boots: dict[str, dict[str, np.ndarray]], target: str, other: str):
    """(pooled difference, its (B,) bootstrap, per-set differences, weights and bootstraps) of target - other."""
    diffs = {k: means[k][target] - means[k][other] for k in means}
    samples = {k: boots[k][target] - boots[k][other] for k in means}
    var = {k: float(np.nanvar(s)) for k, s in samples.items()}
    # A set whose difference never varies (e.g. every caption of both methods scores 0 there) cannot be weighed
    # by its variance: an infinite weight would make it the whole answer. It gets none (noted), unless no set varies.
    informative = {k for k, v in var.items() if v > 0}
    weights = {k: (1.0 / var[k] if k in informative else 0.0) if informative else 1.0 for k in means}
    total = sum(weights.values())
    weights = {k: w / total for k, w in weights.items()}
    point = sum(weights[k] * diffs[k] for k in means)
    pooled = sum(weights[k] * samples[k] for k in means)
    return point, pooled, diffs, weights, samples


def _weight_notes(weights: dict[str, float], target: str, other: str) -> list[str]:
    notes = []
    dominant = [k for k, w in weights.items() if w >= 0.9 and len(weights) > 1]
    if dominant:
        notes.append(f"{dominant[0]} carries {100 * weights[dominant[0]]:.0f}% of the weight, so the pooled interval "
                     "is essentially its own: its difference varies far less than the other sets' (as when both "
                     "methods score near zero there, which says only that neither describes those photos).")
    flat = [k for k, w in weights.items() if w == 0]
    if flat:
        notes.append(f"{', '.join(flat)}: {target} - {other} is the same in every resample (no spread, e.g. every "
                     "caption scores 0 there), so it carries no weight in the pooled interval.")
    return notes


def _cochran_q(table: pd.DataFrame, diff: float) -> tuple[float, float, list[str]]:
    """Cochran's Q of the sets' differences around the pooled one, its p-value, and the sets it counts (those with
    weight and spread); NaN with fewer than two."""
    weighed = [k for k in table.index if table.loc[k, "weight"] > 0 and table.loc[k, "se"] > 0]
    if len(weighed) < 2:
        return math.nan, math.nan, weighed
    q = float(sum((table.loc[k, "diff"] - diff) ** 2 / table.loc[k, "se"] ** 2 for k in weighed))
    return q, chi2_sf(q, len(weighed) - 1), weighed


def _text(word: str, target: str, other: str, diff: float, ci: tuple[float, float], table: pd.DataFrame,
          margin: float, level: float, metric: str, q: float, q_p: float, disagree: bool, alpha: float) -> str:
    sets = ", ".join(f"{k} {x100(r['diff'])} [{x100(r['lo'])}, {x100(r['hi'])}] (weight {r['weight']:.2f})"
                     for k, r in table.iterrows())
    s = (f"Pooled over {len(table)} test set{'s' if len(table) != 1 else ''} ({sets}), {target} - {other} "
         f"({metric}) is {x100(diff)} with a {100 * level:.4g}% interval [{x100(ci[0])}, {x100(ci[1])}] (x100; "
         "inverse-variance weights, a bootstrap resampling each set's images and the methods' seeds jointly). ")
    if not math.isnan(q):
        s += f"The sets {'disagree' if disagree else 'agree'} (Cochran's Q {q:.2f}, p {q_p:.3g}). "
    if disagree:
        if word == INCONCLUSIVE:
            return s + (f"Their differences are further apart than their intervals allow (p below {alpha:g}), so the "
                        "answer depends on the photo collection and the pooled evidence does not decide: the "
                        "pooled interval assumes one common difference, which these sets do not share.")
        return s + (f"Their differences are further apart than their intervals allow, but each set decides the same "
                    f"way on its own: {target} {word} {other} on every set (the pooled interval itself is not "
                    "taken as evidence).")
    if word == COMPETES:
        return s + (f"The pooled evidence decides: the whole interval lies above -{x100(margin)}, the equivalence "
                    f"margin, so {target} competes.")
    if word == DOES_NOT_COMPETE:
        return s + (f"The pooled evidence decides: the whole interval lies below -{x100(margin)}, the equivalence "
                    f"margin, so {target} does not compete with {other}.")
    return s + (f"The pooled evidence does not decide: the interval straddles -{x100(margin)}, the equivalence "
                "margin.")
