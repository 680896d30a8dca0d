"""The sequential plan behind `study decide`: honest error rates under repeated looks, and the seed projection.

Synthetic confirm results with a known truth: per-image scores = image difficulty (shared by methods) + the
method's true mean + a per-seed offset + per-image noise.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.sequential import SequentialPlan, seeds_to_decide, verdict_at
from analysis.verdict import COMPETES, DOES_NOT_COMPETE, INCONCLUSIVE, compute_verdict

ROLES = {"init": "target", "par": "competitor", "none": "floor"}


def _per_image(rng: np.random.Generator, seeds: int, *, diff: float, seed_sd: float, noise_sd: float,
               images: int = 150, difficulty: np.ndarray | None = None) -> pd.DataFrame:
    difficulty = rng.gamma(2.0, 0.25, images) if difficulty is None else difficulty
    rows = []
    for method, mean in (("init", 0.5 + diff), ("par", 0.5), ("none", 0.1)):
        for s in range(seeds):
            offset = rng.normal(0, seed_sd)
            scores = difficulty + mean + offset + rng.normal(0, noise_sd, images)
            rows += [{"method": method, "config_rank": 1, "seed": s, "image_id": i, "CIDEr-D": v}
                     for i, v in enumerate(scores)]
    return pd.DataFrame(rows)


def test_plan_levels_and_bounds():
    plan = SequentialPlan(first_seeds=3, max_seeds=10)
    assert plan.looks == 8
    assert plan.level == pytest.approx(1 - 0.05 / 8)
    assert SequentialPlan(3, 6, spent_alpha=0.05).error_bound == pytest.approx(0.10)
    with pytest.raises(ValueError, match="below the confirm stage's seeds"):
        SequentialPlan(3, 2)


def test_each_look_of_the_plan_is_stricter_than_a_single_95_percent_look():
    """Bonferroni's per-look interval contains the 95% one, so a call made by the plan is also made at 95%,
    never the other way round: here 95% calls 'competes' after 3 seeds, the 8-look plan does not yet."""
    per_image = _per_image(np.random.default_rng(5), 3, diff=0.01, seed_sd=0.03, noise_sd=0.05)
    plan = SequentialPlan(first_seeds=3, max_seeds=10)
    single = compute_verdict(per_image, roles=ROLES, margin=0.02)
    planned = verdict_at(per_image, None, plan, roles=ROLES, margin=0.02)
    assert planned.ci[0] < single.ci[0] and planned.ci[1] > single.ci[1]
    assert (single.verdict, planned.verdict) == (COMPETES, INCONCLUSIVE)
    assert "99.38% paired-bootstrap interval" in planned.text


def test_projection_names_a_seed_count_that_then_decides():
    """Seed variance dominates and init is truly 4 points above the margin: 3 seeds are inconclusive at the
    plan's level, the projection names a count, and a few more seeds than that (same truth) decide. The
    projection assumes the estimate holds, so it is a guide, not a promise."""
    margin = 0.02
    rng = np.random.default_rng(0)
    difficulty = rng.gamma(2.0, 0.25, 150)
    plan = SequentialPlan(first_seeds=3, max_seeds=40)
    first = _per_image(np.random.default_rng(1), 3, diff=0.02, seed_sd=0.05, noise_sd=0.05, difficulty=difficulty)
    assert verdict_at(first, None, plan, roles=ROLES, margin=margin).verdict == INCONCLUSIVE
    needed = seeds_to_decide(first, roles=ROLES, margin=margin, level=plan.level)
    assert needed is not None and 3 < needed <= 40
    more = _per_image(np.random.default_rng(2), needed + 4, diff=0.02, seed_sd=0.05, noise_sd=0.05,
                      difficulty=difficulty)
    assert verdict_at(more, None, plan, roles=ROLES, margin=margin).verdict == COMPETES


def test_projection_says_none_when_the_test_images_limit_it():
    """True difference on the margin and noisy images: no number of seeds clears it."""
    per_image = _per_image(np.random.default_rng(3), 3, diff=-0.05, seed_sd=0.001, noise_sd=0.3)
    assert seeds_to_decide(per_image, roles=ROLES, margin=0.05, level=0.99) is None


def test_a_clear_loss_is_decided_at_the_first_look():
    per_image = _per_image(np.random.default_rng(4), 3, diff=-0.2, seed_sd=0.005, noise_sd=0.05)
    plan = SequentialPlan(first_seeds=3, max_seeds=10)
    assert verdict_at(per_image, None, plan, roles=ROLES, margin=0.02).verdict == DOES_NOT_COMPETE
    assert seeds_to_decide(per_image, roles=ROLES, margin=0.02, level=plan.level) == 3


def test_when_the_test_images_limit_it_the_reach_and_the_images_needed_are_right():
    """Seeds cannot decide (tiny seed variance, noisy images): `test_set_reach` says which margin this test set
    does decide, and how many test images the asked margin would need; with that many images (same truth) it is
    decided. The quickstart's headline used to say "more seeds needed" beside "more seeds will not decide it"."""
    from analysis.sequential import project, test_set_reach

    margin = 0.03
    per_image = _per_image(np.random.default_rng(6), 3, diff=0.0, seed_sd=0.0005, noise_sd=0.3)
    assert compute_verdict(per_image, roles=ROLES, margin=margin).verdict == INCONCLUSIVE
    assert seeds_to_decide(per_image, roles=ROLES, margin=margin, level=0.95) is None
    parts = project(per_image, roles=ROLES, margin=margin)
    reach, needed = test_set_reach(parts, margin, images=150)
    assert margin < reach < 0.2
    # The reach is what unlimited seeds would allow: seeds decide margins above it, and none below it.
    assert seeds_to_decide(per_image, roles=ROLES, margin=1.1 * reach, level=0.95, limit=1000) is not None
    assert seeds_to_decide(per_image, roles=ROLES, margin=0.9 * reach, level=0.95, limit=1000) is None
    assert 150 < needed < 5000
    more = _per_image(np.random.default_rng(7), 3, diff=0.0, seed_sd=0.0005, noise_sd=0.3, images=int(1.4 * needed))
    assert compute_verdict(more, roles=ROLES, margin=margin).verdict == COMPETES
