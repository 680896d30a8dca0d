"""A pooled verdict over several test sets: one interval for ``target - best other`` from every set at once.

Input: one per-image frame per test set (the study's own test split, and every other photo collection the
confirm runs were scored on, ``study evaluate``), each as ``analysis.verdict.compute_verdict`` takes it:
``method, config_rank, seed, image_id`` and the metric (0..1). The same confirm runs (checkpoints) score every
set, so the sets share their seeds and differ in their images.

The method (fixed-effect inverse-variance pooling, with one joint bootstrap):

* one bootstrap resample draws, for each method, its seeds once (the same draw for every set: a lucky seed is
  lucky on every set), and, for each set on its own, that set's images (paired across methods within the set,
  as in the single-set verdict);
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
* the compared method is the competitor with the smallest pooled difference (the strongest over all sets),
  chosen on the point estimates and held fixed, as the single-set verdict does;
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

from analysis.scores import x100
from analysis.verdict import (
    COMPETES,
    DOES_NOT_COMPETE,
    INCONCLUSIVE,
    NOT_AVAILABLE,
    PRIMARY,
    _boot_means,
    _interval,
    _method_arrays,
    _paired_images,
    _resample_weights,
    _split_roles,
)

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


def _word(ci: tuple[float, float], margin: float) -> str:
    if any(math.isnan(v) for v in ci):
        return NOT_AVAILABLE
    return COMPETES if ci[0] > -margin else DOES_NOT_COMPETE if ci[1] < -margin else INCONCLUSIVE


def pooled_verdict(sets: Mapping[str, pd.DataFrame], *, roles: Mapping[str, str], margin: float,
                   metric: str = PRIMARY, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                   alpha: float = 0.05) -> PooledVerdict:
    """Pool ``target - best other`` over the test sets (``{set name: per-image frame}``, in display order); see the
    module docstring for the method. Each method is represented by its lowest ``config_rank`` in every set, by the
    seeds every set scored, and each set by the images every compared method scored in it. Deterministic given
    ``seed``. A set without the target or any competitor is left out (noted)."""
    target, competitors, _ = _split_roles(roles)
    notes: list[str] = []
    blocks = _usable_sets(sets, target, competitors, metric, notes)
    others = [m for m in competitors if all(m in ranks.index for _, ranks, _ in blocks.values())]
    if not blocks or not others:
        return _not_available(target, margin, level, metric, notes,
                              "No test set holds both the target and a competitor: nothing to pool.")
    methods = [target, *others]
    # The seeds every set scored, per method (normally all: every set is scored by every confirm run).
    seeds = {m: sorted(set.intersection(*[set(c.loc[c["method"] == m, "seed"]) for c, _, _ in blocks.values()]))
             for m in methods}
    unseeded = [m for m in methods if not seeds[m]]
    if unseeded:
        return _not_available(target, margin, level, metric, notes,
                              f"No seed of {unseeded[0]} was scored on every test set: nothing to pool.")
    means, boots = _set_bootstraps(blocks, methods, seeds, metric, n_boot, seed)
    other = min(others, key=lambda m: _pool(means, boots, target, m)[0])  # the strongest competitor over all sets
    diff, pooled, diffs, weights, samples = _pool(means, boots, target, other)
    notes += _weight_notes(weights, target, other)
    ci = _interval(pooled, level)
    rows = []
    for k, (_, _, images) in blocks.items():
        lo, hi = _interval(samples[k], level)
        rows.append({"set": k, "images": int(images.size), "seeds": min(len(seeds[target]), len(seeds[other])),
                     "diff": diffs[k], "lo": lo, "hi": hi, "se": float(np.nanstd(samples[k])), "weight": weights[k],
                     "verdict": _word((lo, hi), margin)})
    table = pd.DataFrame(rows).set_index("set")
    q, q_p, weighed = _cochran_q(table, diff)
    disagree = bool(q_p < alpha)
    words = set(table.loc[weighed, "verdict"]) if weighed else set(table["verdict"])
    if disagree:
        word = words.pop() if len(words) == 1 and words <= {COMPETES, DOES_NOT_COMPETE} else INCONCLUSIVE
    else:
        word = _word(ci, margin)
    text = _text(word, target, other, diff, ci, table, margin, level, metric, q, q_p, disagree, alpha)
    return PooledVerdict(word, target, other, diff, ci, margin, level, metric, table, q, q_p, disagree,
                         text + (" " + " ".join(notes) if notes else ""), n_boot, pooled, notes)


def _not_available(target: str, margin: float, level: float, metric: str, notes: list[str],
                   text: str) -> PooledVerdict:
    empty = pd.DataFrame(columns=SET_COLUMNS).rename_axis("set")
    return PooledVerdict(NOT_AVAILABLE, target, None, math.nan, (math.nan, math.nan), margin, level, metric, empty,
                         text=text, notes=notes)


def _usable_sets(sets: Mapping[str, pd.DataFrame], target: str, competitors: list[str], metric: str,
                 notes: list[str]) -> dict[str, tuple[pd.DataFrame, pd.Series, np.ndarray]]:
    """Per set with the target and a competitor: (its rows of each method's best rank, the ranks, its images)."""
    blocks = {}
    for name, frame in sets.items():
        if frame is None or frame.empty or metric not in frame:
            notes.append(f"{name} has no per-image {metric}: left out.")
            continue
        frame = frame if "config_rank" in frame else frame.assign(config_rank=1)
        chosen, ranks, images = _paired_images(frame, [])
        if target not in ranks.index or not any(m in ranks.index for m in competitors) or images.size == 0:
            notes.append(f"{name} lacks {target} or every competitor: left out.")
            continue
        blocks[name] = (chosen, ranks, images)
    return blocks


def _set_bootstraps(blocks: dict[str, tuple[pd.DataFrame, pd.Series, np.ndarray]], methods: list[str],
                    seeds: dict[str, list[int]], metric: str, n_boot: int, seed: int):
    """Per set, each method's mean and its bootstrap means: images resampled within the set, seeds resampled once
    per method for every set (the same checkpoints score each set)."""
    rng = np.random.default_rng(seed)
    seed_w = {m: _resample_weights(rng, n_boot, len(seeds[m])) for m in methods}  # (B, S_m), shared by the sets
    means: dict[str, dict[str, float]] = {}
    boots: dict[str, dict[str, np.ndarray]] = {}
    for name, (chosen, ranks, images) in blocks.items():
        arrays = {}
        for m in methods:
            rows = chosen[(chosen["method"] == m) & chosen["seed"].isin(seeds[m])]
            arrays[m] = _method_arrays(rows, m, int(ranks[m]), images, [metric])[metric]  # (S_m, N_k), seeds sorted
        image_w = _resample_weights(rng, n_boot, images.size)  # (B, N_k): this set's own image resample
        boot = _boot_means([arrays[m] for m in methods], [seed_w[m] for m in methods], image_w)
        boots[name] = dict(zip(methods, boot))
        means[name] = {m: float(np.nanmean(arrays[m])) for m in methods}
    return means, boots


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
