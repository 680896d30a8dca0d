"""The verdict: does memory seeding (``init``) compete with the other ways of injecting the image?

Input is the confirm stage's per-image table (one row per method, seed and test image; metric values on
pycocoevalcap's 0..1 scale) and its per-run table (parameter count, training time). For every method we
estimate the mean score over seeds and test images with a 95% interval from a two-level bootstrap:

* seeds are resampled with replacement, separately for each method (seed 0 of ``pre`` has nothing to do
  with seed 0 of ``init``);
* test images are resampled with replacement, with the *same* image resample for every method (paired),
  because image difficulty is shared: an easy image is easy for every captioner, and pairing removes that
  variance from differences between methods.

Each method's role comes in as data (``roles``: ``{method: "target" | "competitor" | "floor"}``, from the
study's method registry), so a newly registered method is compared without a change here. The difference
``target - comparator`` (the target is ``init``; the comparator is the arm fixed before any test split was
scored, the best other arm on validation, when the caller gives one; else the competitor, e.g. among
pre/par/merge/attention, with the highest mean primary metric; a floor such as ``none`` only shows how much
the image adds) gets its paired bootstrap interval, and the verdict is a non-inferiority test against an
equivalence ``margin`` (same 0..1 units):

* "competes": the whole interval lies above ``-margin`` (init is at most ``margin`` worse, or better);
* "does not compete": the whole interval lies below ``-margin``;
* otherwise "inconclusive" (whether more seeds, or only more test images, could decide it is the report's
  decision note: ``study.stages.decide.decision_note``).

The same resamples give every interval (``analysis.bootstrap``) and the table of the words at other margins
(``analysis.margins``). Caveats written into the text: a best other method chosen on the test point estimates is
held fixed (choosing it inside every bootstrap resample would widen the interval slightly), and a bootstrap
over 3 seeds understates seed-to-seed variance by a factor of about (n-1)/n.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from analysis.bootstrap import boot_means as _boot_means
from analysis.bootstrap import image_weights, seed_weights
from analysis.bootstrap import interval as _interval
from analysis.margins import COMPETES, DOES_NOT_COMPETE, NOT_AVAILABLE, margin_table, word
from analysis.margins import INCONCLUSIVE as INCONCLUSIVE  # the verdict's words, imported from here too
from analysis.metric_table import MEAN_OVER_IMAGES
from analysis.scores import x100

# The verdict compares metrics whose test-set score is the mean of its per-image scores (coco-caption averages
# CIDEr-D and ROUGE-L over images), so resampling images resamples the score itself. BLEU and METEOR pool counts
# over the corpus first: their per-image mean is another, lower number (``analysis.scores`` prints them).
PRIMARY = "CIDEr-D"
# The roles a method can have in the verdict (the registry assigns them).
TARGET = "target"  # the method the question asks about (init)
COMPETITOR = "competitor"  # the real injections the target competes with
FLOOR = "floor"  # no image at all: how much the image helps
ROLES = (TARGET, COMPETITOR, FLOOR)

TEST_SET = "test"  # the name a set's image resample is keyed by when the caller names none (analysis.bootstrap)


@dataclass
class Verdict:
    """The answer plus everything needed to print or log it.

    ``table`` has one row per method (index ``method``) with columns ``role`` (its role in the verdict; empty
    for a method without one), ``config_rank, seeds, images``, for each metric ``<m>``, ``<m>_lo``, ``<m>_hi``
    (0..1 scale), and ``params, train_seconds, epochs`` (means over the method's confirm runs; NaN when unknown).
    """

    verdict: str
    diff: float  # target - best other, primary metric, 0..1 scale
    ci: tuple[float, float]  # paired-bootstrap interval of diff at ``level``
    best_other: str | None
    margin: float
    metric: str
    table: pd.DataFrame
    text: str
    n_boot: int = 0
    notes: list[str] = field(default_factory=list)
    target: str | None = None  # the method with the role "target" (init)
    level: float = 0.95  # confidence level of every interval (below 0.95 never; a sequential plan raises it)
    diff_samples: np.ndarray | None = field(default=None, repr=False)  # (n_boot,) bootstrap target - best other
    # target - each other method (index ``method``): ``diff``, ``lo``, ``hi`` at ``level``, paired like the verdict.
    pairwise: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["diff", "lo", "hi"]))
    # The words at margins of 1, 2, 3 points and 4% of the comparator's score (``analysis.margins``), same resamples.
    margins: pd.DataFrame = field(default_factory=lambda: margin_table(math.nan, (math.nan, math.nan), math.nan))
    # method -> (n_boot,) bootstrap means of ``metric``: what the pooled verdict reuses (one draw per difference).
    samples: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    seed: int = 0  # the bootstrap's seed, and the set name its image resample is keyed by (analysis.bootstrap)
    set_name: str = TEST_SET
    comparator_fixed: bool = False  # whether best_other was fixed before the test split was scored (else: test means)

    def to_dict(self) -> dict[str, Any]:
        """Flat, JSON-friendly summary for MLflow: numbers stay numbers, per-method means as ``<m>.<metric>``."""
        out: dict[str, Any] = {
            "verdict": self.verdict, "metric": self.metric, "best_other": self.best_other,
            "diff": self.diff, "ci_low": self.ci[0], "ci_high": self.ci[1], "margin": self.margin,
            "n_boot": self.n_boot, "text": self.text,
        }
        for method, row in self.table.iterrows():
            for metric in MEAN_OVER_IMAGES:
                if metric in row and not pd.isna(row[metric]):
                    out[f"{method}.{metric}"] = float(row[metric])
                    out[f"{method}.{metric}_lo"] = float(row[f"{metric}_lo"])
                    out[f"{method}.{metric}_hi"] = float(row[f"{metric}_hi"])
            for col in ("params", "train_seconds"):
                if col in row and not pd.isna(row[col]):
                    out[f"{method}.{col}"] = float(row[col])
        return out


def _method_arrays(per_image: pd.DataFrame, method: str, rank: int, images: np.ndarray,
                   metrics: list[str]) -> dict[str, np.ndarray]:
    """{metric: (S, N) array} of one method's scores, seeds as rows, images in the order of ``images``."""
    rows = per_image[(per_image["method"] == method) & (per_image["config_rank"] == rank)]
    out = {}
    for metric in metrics:
        wide = rows.groupby(["seed", "image_id"])[metric].mean().unstack("image_id")  # (S, N')
        out[metric] = wide.reindex(columns=images).to_numpy(dtype=float)  # (S, N), NaN where missing
    return out


def _run_costs(runs: pd.DataFrame | None, method: str, rank: int) -> dict[str, float]:
    cols = ("params", "train_seconds", "epochs")
    if runs is None or runs.empty or "method" not in runs:
        return {c: math.nan for c in cols}
    sel = runs[(runs["method"] == method)]
    if "config_rank" in sel:
        sel = sel[sel["config_rank"] == rank]
    return {c: float(sel[c].mean()) if c in sel and len(sel) else math.nan for c in cols}


def _split_roles(roles: Mapping[str, str]) -> tuple[str, list[str], list[str]]:
    """(target, competitors, floors) from ``{method: role}``, in the mapping's order; exactly one target."""
    unknown = {m: r for m, r in roles.items() if r not in ROLES}
    if unknown:
        raise ValueError(f"unknown roles {unknown}; allowed: {', '.join(ROLES)}")
    targets = [m for m, r in roles.items() if r == TARGET]
    if len(targets) != 1:
        raise ValueError(f"the verdict needs exactly one method with role {TARGET!r}, got {targets}")
    return (targets[0], [m for m, r in roles.items() if r == COMPETITOR], [m for m, r in roles.items() if r == FLOOR])


def _check_arguments(margin: float, metric: str) -> None:
    if margin < 0:
        raise ValueError(f"margin must be >= 0 (0..1 scale), got {margin}")
    if metric not in MEAN_OVER_IMAGES:
        raise ValueError(f"the verdict's metric must be the mean of per-image scores, one of "
                         f"{', '.join(MEAN_OVER_IMAGES)}; {metric} is a corpus statistic (see analysis.scores)")


def _checked(per_image: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, list[str]]:
    """``per_image`` with the columns the verdict needs (a ValueError names the missing ones), a ``config_rank``
    of 1 where it has none; and the metrics to bootstrap (``metric`` first, then the other means over images)."""
    missing = {"method", "seed", "image_id", metric} - set(per_image.columns)
    if missing:
        raise ValueError(f"per_image lacks columns {sorted(missing)}; it has {sorted(per_image.columns)}")
    per_image = per_image if "config_rank" in per_image else per_image.assign(config_rank=1)
    return per_image, [m for m in dict.fromkeys([metric, *MEAN_OVER_IMAGES]) if m in per_image.columns]


def _in_display_order(methods, roles: Mapping[str, str], notes: list[str]) -> list[str]:
    """The methods in the roles' order; one without a role (e.g. since removed) last, and a note says so."""
    order = list(roles)
    methods = sorted(methods, key=lambda m: (order.index(m) if m in order else len(order), m))
    roleless = [m for m in methods if m not in roles]
    if roleless:
        notes.append(f"{', '.join(roleless)} had no role in the verdict: shown, not compared.")
    return methods


def compute_verdict(per_image: pd.DataFrame, runs: pd.DataFrame | None = None, *, roles: Mapping[str, str],
                    margin: float = 0.02, metric: str = PRIMARY, n_boot: int = 2000, seed: int = 0,
                    level: float = 0.95, resample_seeds: bool = True, comparator: str | None = None,
                    set_name: str = TEST_SET) -> Verdict:
    """Per-method means with ``level`` intervals, ``target - comparator`` with its paired interval, the verdict.

    ``per_image`` columns: ``method, config_rank, seed, image_id`` and the metrics in ``MEAN_OVER_IMAGES`` (0..1;
    missing metrics or NaN values are allowed). ``roles``: ``{method: "target" | "competitor" | "floor"}`` in
    display order, one target. Each method is represented by its lowest ``config_rank`` (the search's best on
    validation). Only images scored for every method enter (paired). Deterministic given ``seed``. ``level``
    above 0.95: a sequential plan's per-look level; ``resample_seeds=False`` resamples test images only (the image
    part of the variance). ``comparator``: the arm fixed before any test split was scored (the best
    other on validation); None: the competitor with the highest test mean. ``set_name`` keys this set's image
    resample (``analysis.bootstrap``), as the pooled verdict keys it: the same difference, the same interval.
    """
    _check_arguments(margin, metric)
    target, competitors, floors = _split_roles(roles)
    notes: list[str] = []
    empty = pd.DataFrame(columns=["config_rank", "seeds", "images"])
    if per_image is None or per_image.empty:
        return Verdict(NOT_AVAILABLE, math.nan, (math.nan, math.nan), None, margin, metric, empty,
                       "No confirm results: the verdict needs the confirm stage's per-image scores.", 0, notes,
                       target)
    per_image, metrics = _checked(per_image, metric)
    chosen, ranks, images = _paired_images(per_image, notes)
    if images.size == 0:
        return Verdict(NOT_AVAILABLE, math.nan, (math.nan, math.nan), None, margin, metric, empty,
                       "The methods share no scored test image, so they cannot be compared.", 0, notes, target)
    methods = _in_display_order(ranks.index, roles, notes)
    arrays = {m: _method_arrays(chosen, m, int(ranks[m]), images, metrics) for m in methods}
    boots = _bootstrap(arrays, metrics, metric, n_boot, seed, set_name, resample_seeds)
    table = _method_table(arrays, boots, runs, ranks, roles, metrics, metric, images.size, level)
    samples = {m: boots[m, metric] for m in methods}

    best_other, lacking = _compared(table, target, competitors, comparator, metric)
    if best_other is None:
        return Verdict(NOT_AVAILABLE, math.nan, (math.nan, math.nan), None, margin, metric, table,
                       f"The confirm results have no {lacking}, so there is nothing to compare.", n_boot, notes,
                       target, level, samples=samples, seed=seed, set_name=set_name)
    pairwise = _pairwise(table, boots, target, metric, level)
    diff_boot = samples[target] - samples[best_other]  # paired through the shared image resample
    diff = float(table.loc[target, metric] - table.loc[best_other, metric])
    ci = _interval(diff_boot, level)

    verdict = word(ci, margin)
    text = _paragraph(verdict, diff, ci, target, best_other, floors, margin, metric, table, notes, level,
                      fixed=comparator is not None)
    return Verdict(verdict, diff, ci, best_other, margin, metric, table, text, n_boot, notes, target, level, diff_boot,
                   pairwise, margin_table(diff, ci, float(table.loc[best_other, metric]), margin), samples, seed,
                   set_name, comparator is not None)


def _compared(table: pd.DataFrame, target: str, competitors: list[str], comparator: str | None,
              metric: str) -> tuple[str | None, str]:
    """(the arm the target is compared with: the fixed ``comparator``, else the competitor with the highest mean;
    None and what is lacking when the table has no target or no such arm)."""
    if comparator is not None and comparator == target:
        raise ValueError(f"the comparator {comparator!r} is the target itself")
    scored = [m for m in ([comparator] if comparator else competitors)
              if m in table.index and not math.isnan(table.loc[m, metric])]
    if target not in table.index or not scored:
        return None, (target if target not in table.index else (
            f"the comparator fixed before the test split was scored, {comparator}" if comparator
            else "any of " + "/".join(competitors)))
    return comparator or max(scored, key=lambda m: table.loc[m, metric]), ""


def _pairwise(table: pd.DataFrame, boots: dict[tuple[str, str], np.ndarray], target: str, metric: str,
              level: float) -> pd.DataFrame:
    """``target - method`` for every other scored method (index ``method``): ``diff`` and its paired ``lo``, ``hi``."""
    rows = [{"method": m, "diff": float(table.loc[target, metric] - table.loc[m, metric]),
             **dict(zip(("lo", "hi"), _interval(boots[target, metric] - boots[m, metric], level)))}
            for m in table.index if m != target and not math.isnan(table.loc[m, metric])]
    return pd.DataFrame(rows, columns=["method", "diff", "lo", "hi"]).set_index("method")


def _paired_images(per_image: pd.DataFrame, notes: list[str]) -> tuple[pd.DataFrame, pd.Series, np.ndarray]:
    """(rows of each method's best-ranked configuration, that rank per method, the sorted image ids every method
    scored). Paired: an image some method lacks is left out (normally the whole test split stays)."""
    ranks = per_image.groupby("method")["config_rank"].min()
    chosen = per_image[per_image["config_rank"] == per_image["method"].map(ranks)]
    image_sets = [set(g["image_id"]) for _, g in chosen.groupby("method")]
    common = set.intersection(*image_sets)
    dropped = set.union(*image_sets) - common
    if dropped:
        notes.append(f"{len(dropped)} images not scored for every method were left out of the comparison.")
    return chosen, ranks, np.array(sorted(common))


def _bootstrap(arrays: dict[str, dict[str, np.ndarray]], metrics: list[str], metric: str, n_boot: int, seed: int,
               set_name: str, resample_seeds: bool) -> dict[tuple[str, str], np.ndarray]:
    """(method, metric) -> the (B,) bootstrap means. One image resample is shared by all methods (paired); each
    method's seeds are resampled on their own, or (``resample_seeds=False``) each seed weighs the same. Each
    resample comes from its own keyed generator (``analysis.bootstrap``), whatever else is computed beside it."""
    n_images = next(iter(arrays.values()))[metric].shape[1]
    image_w = image_weights(seed, set_name, n_boot, n_images)  # (B, N)
    seed_w = {m: seed_weights(seed, m, n_boot, arrays[m][metric].shape[0]) for m in arrays}  # (B, S_m)
    if not resample_seeds:
        seed_w = {m: np.full_like(w, 1.0 / w.shape[1]) for m, w in seed_w.items()}
    keys = [(m, k) for m in arrays for k in metrics]
    return dict(zip(keys, _boot_means([arrays[m][k] for m, k in keys], [seed_w[m] for m, _ in keys], image_w)))


def _method_table(arrays: dict[str, dict[str, np.ndarray]], boots: dict[tuple[str, str], np.ndarray],
                  runs: pd.DataFrame | None, ranks: pd.Series, roles: Mapping[str, str], metrics: list[str],
                  metric: str, n_images: int, level: float) -> pd.DataFrame:
    """One row per method (index ``method``): role, rank, seeds, images, each metric's mean and interval, costs."""
    rows = []
    for m in arrays:
        row: dict[str, Any] = {"method": m, "role": roles.get(m, ""), "config_rank": int(ranks[m]),
                               "seeds": arrays[m][metric].shape[0], "images": n_images}
        for k in metrics:
            x = arrays[m][k]
            row[k] = float(np.nanmean(x)) if np.isfinite(x).any() else math.nan
            row[f"{k}_lo"], row[f"{k}_hi"] = _interval(boots[m, k], level)
        row.update(_run_costs(runs, m, int(ranks[m])))
        rows.append(row)
    return pd.DataFrame(rows).set_index("method")


def _paragraph(word: str, diff: float, ci: tuple[float, float], target: str, best_other: str, floors: list[str],
               margin: float, metric: str, table: pd.DataFrame, notes: list[str], level: float = 0.95,
               fixed: bool = False) -> str:
    """The verdict in words, numbers x100 as the captioning literature prints them."""
    tgt, other = table.loc[target], table.loc[best_other]
    which = ("the comparator fixed before the test split was scored" if fixed else "the best other injection")
    s = (f"The target arm {target} scores {metric} {x100(tgt[metric])} "
         f"[{x100(tgt[metric + '_lo'])}, {x100(tgt[metric + '_hi'])}] against {x100(other[metric])} "
         f"[{x100(other[metric + '_lo'])}, {x100(other[metric + '_hi'])}] for {which} "
         f"({best_other}); the difference {target} - {best_other} is {x100(diff)} with a {100 * level:.4g}% "
         "paired-bootstrap "
         f"interval [{x100(ci[0])}, {x100(ci[1])}] (x100; {int(tgt['seeds'])} seeds of {target}, "
         f"{int(other['seeds'])} of {best_other}, {int(tgt['images'])} test images). ")
    if word == COMPETES:
        s += (f"The whole interval lies above -{x100(margin)}, the equivalence margin, so {target} competes: "
              f"it is at most {x100(margin)} points worse")
        s += (" and in fact better." if ci[0] > margin else ".")
    elif word == DOES_NOT_COMPETE:
        s += (f"The whole interval lies below -{x100(margin)}, the equivalence margin, so {target} does not "
              f"compete with {best_other}.")
    else:
        s += (f"The interval straddles -{x100(margin)}, the equivalence margin: the data cannot yet tell "
              f"whether {target} is within the margin (the decision note says whether more seeds could decide it).")
    for floor in floors:
        if floor in table.index and not math.isnan(table.loc[floor, metric]):
            s += (f" Without any image ({floor}) the decoder reaches {x100(table.loc[floor, metric])}, so the "
                  f"image adds {x100(tgt[metric] - table.loc[floor, metric])} points to {target}.")
    if not (math.isnan(tgt["params"]) or math.isnan(other["params"])):
        s += (f" {target} has {tgt['params'] / 1e6:.2f} M parameters and trained {tgt['train_seconds']:.0f} s "
              f"per run; {best_other} {other['params'] / 1e6:.2f} M and {other['train_seconds']:.0f} s.")
    s += ("" if fixed else " The best other method was picked on point estimates and held fixed across resamples;")
    s += (" with few" if not fixed else " With few") + " seeds the bootstrap understates seed variance."
    if notes:
        s += " " + " ".join(notes)
    return s
