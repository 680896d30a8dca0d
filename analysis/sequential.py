"""Buying certainty: add confirm seeds until the verdict is decided, without inflating the error rate.

Looking at a 95% interval after every added seed and stopping as soon as it clears the margin is not a 95%
procedure: each look is one more chance of a wrong call. The plan here fixes, before the first look, the most
seeds per method (``max_seeds``) and so the number of looks ``K = max_seeds - first_seeds + 1`` (one look at
the confirm stage's seeds, then one per added seed), and gives every look the level ``1 - alpha / K``
(Bonferroni): the chance of any wrong call over all looks is at most ``alpha`` whatever the correlation
between looks. Group-sequential boundaries (O'Brien-Fleming) would spend less at early looks; Bonferroni is
conservative, but it needs no distributional assumption, so it holds for a bootstrap interval.

A study whose spec planned no extra seeds (``confirm.max_seeds`` unset) already had its one look at 95%;
continuing it is a second plan, and its error bound is the sum of both (``spent_alpha + alpha``), which the
report states.

``project`` splits the bootstrap variance of the difference into a seed part (shrinks as 1/seeds) and an image
part (shrinks as 1/test images; more seeds do not cut it), both measured. ``seeds_to_decide`` returns the first
seed count whose projected interval clears the margin, assuming the difference stays at its estimate (``None``:
more seeds alone would not decide it); ``what_decides`` says what would: more seeds, more test images, or both,
with numbers (never fewer images than the set has).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from analysis.verdict import PRIMARY, TEST_SET, Verdict, compute_verdict


@dataclass(frozen=True)
class SequentialPlan:
    """Looks at ``first_seeds``, ``first_seeds + 1``, ... ``max_seeds`` seeds per method, each at ``level``."""

    first_seeds: int
    max_seeds: int
    alpha: float = 0.05
    spent_alpha: float = 0.0  # error rate already spent by an unplanned earlier look (a fixed 95% report)

    def __post_init__(self) -> None:
        if self.max_seeds < self.first_seeds:
            raise ValueError(f"max_seeds ({self.max_seeds}) is below the confirm stage's seeds ({self.first_seeds})")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")

    @property
    def looks(self) -> int:
        return self.max_seeds - self.first_seeds + 1

    @property
    def level(self) -> float:
        """The confidence level of every look's interval."""
        return 1.0 - self.alpha / self.looks

    @property
    def error_bound(self) -> float:
        """Chance of any wrong call over the whole procedure (union bound)."""
        return self.spent_alpha + self.alpha

    def describe(self) -> str:
        text = (f"sequential plan: up to {self.max_seeds} seeds per method, {self.looks} looks, each a "
                f"{100 * self.level:.2f}% interval (Bonferroni), overall error rate at most "
                f"{100 * self.error_bound:g}%")
        if self.spent_alpha:
            text += f" (including {100 * self.spent_alpha:g}% spent by the unplanned first look)"
        return text


@dataclass(frozen=True)
class Projection:
    """The pieces of the projection: the estimate, the seeds and test images it rests on and the two variance
    parts of the difference's bootstrap variance (seeds: shrinks as 1/seeds; test images: as 1/images)."""

    diff: float
    seeds: int
    var_per_seed: float  # seed part of the difference's variance at one seed (divide by n at n seeds)
    var_images: float  # test-image part at ``images`` images (times images / N at N images; not cut by seeds)
    images: int = 0  # the test images the estimate rests on (0: unknown)

    def half_width(self, level: float, seeds: float, images: float | None = None) -> float:
        """The projected half-width of the ``level`` interval at ``seeds`` per method and ``images`` test images."""
        z = NormalDist().inv_cdf(0.5 + level / 2)
        image_part = self.var_images * (self.images / images if images and self.images else 1.0)
        return z * math.sqrt(self.var_per_seed / seeds + image_part)

    def seeds_needed(self, level: float, margin: float, limit: int = 100) -> int | None:
        gap = abs(self.diff + margin)  # the half-width must undercut the estimate's distance from the margin
        for n in range(self.seeds, limit + 1):
            if self.half_width(level, n) < gap:
                return n
        return None

    def images_needed(self, level: float, margin: float, seeds: int | None = None) -> int | None:
        """Test images at which the ``level`` interval at ``seeds`` (default: the current count) would clear the
        margin: None when no number would (the seed part alone is too wide, or the estimate sits on the margin).
        Never fewer than the images in hand: if those suffice by this projection, it returns that count."""
        z = NormalDist().inv_cdf(0.5 + level / 2)
        room = (abs(self.diff + margin) / z) ** 2 - self.var_per_seed / (seeds or self.seeds)
        if room <= 0 or not self.images:
            return None
        if self.var_images == 0:
            return self.images
        return max(self.images, math.ceil(self.images * self.var_images / room))


@dataclass(frozen=True)
class Reach:
    """What would decide the verdict, by the projection: ``seeds`` alone (images as they are), ``images`` alone
    (seeds as they are), or both (``both``: seeds and images together, each taking half of what the margin
    leaves); None where that way cannot decide it."""

    seeds: int | None
    images: int | None
    both: tuple[int, int] | None

    def describe(self, parts: Projection, metric_points) -> str:
        """One sentence; ``metric_points(x)`` formats a 0..1 value as the report prints it."""
        now = f"{parts.seeds} seeds per method and {parts.images} test images"
        if self.seeds is None and self.images is None and self.both is None:
            return (f"Neither more seeds nor more test images are projected to decide it (the estimate "
                    f"{metric_points(parts.diff)} sits on the margin), from {now}.")
        ways = []
        if self.seeds is not None:
            ways.append(f"more seeds: about {self.seeds} seeds per method with the {parts.images} test images")
        if self.images is not None:
            ways.append(f"more test images: about {self.images:,} with {parts.seeds} seeds per method")
        if self.both is not None and self.seeds is None and self.images is None:
            ways.append(f"both: about {self.both[0]} seeds per method and {self.both[1]:,} test images")
        alone = [w for w, v in (("more seeds alone", self.seeds), ("more test images alone", self.images))
                 if v is None]
        sd_seed, sd_images = metric_points(parts.var_per_seed ** 0.5), metric_points(parts.var_images ** 0.5)
        return (f"Projected from {now} (the difference's standard deviation from seeds {sd_seed} at one seed, from "
                f"the test images {sd_images}), "
                f"what would decide it: {'; '.join(ways)}"
                + (f" ({' and '.join(alone)} would not)." if alone else ".")
                + " Assuming the difference stays at its estimate: a guide, not a promise.")


def what_decides(parts: Projection, level: float, margin: float, limit: int = 100) -> Reach:
    """Seeds alone, test images alone, and both together that the projection says would decide the verdict."""
    seeds = parts.seeds_needed(level, margin, limit)
    images = parts.images_needed(level, margin)
    both = None
    z = NormalDist().inv_cdf(0.5 + level / 2)
    allowance = (abs(parts.diff + margin) / z) ** 2
    if allowance > 0 and parts.images:
        n = max(parts.seeds, math.ceil(2 * parts.var_per_seed / allowance))  # the seed part takes half
        both = (n, max(parts.images, math.ceil(2 * parts.var_images * parts.images / allowance)))
    return Reach(seeds if seeds is None or seeds > parts.seeds else parts.seeds,
                 images if images is None or images > parts.images else parts.images, both)


def test_set_reach(parts: Projection, margin: float, images: int, level: float = 0.95) -> tuple[float, float | None]:
    """What the test images allow even with unlimited seeds: (the smallest margin at which the target would be
    found to compete, given the estimate; the test images that ``margin`` would need with unlimited seeds, never
    fewer than ``images``, the images in hand; None when the estimate sits on the margin). The image part of the
    variance shrinks as 1 / images."""
    z = NormalDist().inv_cdf(0.5 + level / 2)
    half = z * math.sqrt(parts.var_images)
    reach = max(half - parts.diff, 0.0)
    gap = abs(parts.diff + margin)
    needed = None if gap == 0 else max(float(images), images * (half / gap) ** 2)
    return reach, needed


def project(per_image: pd.DataFrame, *, roles: Mapping[str, str], margin: float, metric: str = PRIMARY,
            n_boot: int = 2000, seed: int = 0, comparator: str | None = None,
            set_name: str = TEST_SET) -> Projection | None:
    """Split the bootstrap variance of ``target - comparator`` (``analysis.verdict``: the fixed comparator, else
    the best other on test) into its seed and image parts (None: no comparison possible)."""
    kwargs = dict(roles=roles, margin=margin, metric=metric, n_boot=n_boot, seed=seed, comparator=comparator,
                  set_name=set_name)
    both = compute_verdict(per_image, **kwargs)
    if both.best_other is None or both.diff_samples is None:
        return None
    images = compute_verdict(per_image, resample_seeds=False, **kwargs)
    seeds = int(min(both.table.loc[both.target, "seeds"], both.table.loc[both.best_other, "seeds"]))
    var_all, var_images = float(np.nanvar(both.diff_samples)), float(np.nanvar(images.diff_samples))
    return Projection(both.diff, seeds, max(var_all - var_images, 0.0) * seeds, var_images,
                      int(both.table.loc[both.target, "images"]))


def seeds_to_decide(per_image: pd.DataFrame, *, roles: Mapping[str, str], margin: float, level: float,
                    metric: str = PRIMARY, n_boot: int = 2000, seed: int = 0, limit: int = 100,
                    comparator: str | None = None) -> int | None:
    """Projected seeds per method at which the ``level`` interval of ``target - best other`` clears
    ``-margin``; the current count if it already does; ``None`` if no count up to ``limit`` would."""
    parts = project(per_image, roles=roles, margin=margin, metric=metric, n_boot=n_boot, seed=seed,
                    comparator=comparator)
    return None if parts is None else parts.seeds_needed(level, margin, limit)


def smallest_plan(parts: Projection, margin: float, *, spent_alpha: float = 0.0, alpha: float = 0.05,
                  limit: int = 50) -> SequentialPlan | None:
    """The smallest ``max_seeds`` whose plan (from ``parts.seeds`` on) is projected to decide, or None."""
    for max_seeds in range(parts.seeds, limit + 1):
        plan = SequentialPlan(parts.seeds, max_seeds, alpha, spent_alpha)
        if parts.seeds_needed(plan.level, margin, limit=max_seeds) is not None:
            return plan
    return None


def verdict_at(per_image: pd.DataFrame, runs: pd.DataFrame | None, plan: SequentialPlan, *,
               roles: Mapping[str, str], margin: float, metric: str = PRIMARY, n_boot: int = 2000,
               seed: int = 0, comparator: str | None = None, set_name: str = TEST_SET) -> Verdict:
    """The verdict at the plan's level (what ``study decide`` and the report use once a plan exists)."""
    return compute_verdict(per_image, runs, roles=roles, margin=margin, metric=metric, n_boot=n_boot, seed=seed,
                           level=plan.level, comparator=comparator, set_name=set_name)
