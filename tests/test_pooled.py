"""The verdict pooled over every test set (issue 20, item 3b): ``analysis.pooled`` on synthetic per-image scores.
Sets that agree give a pooled interval narrower than either set's own; sets that disagree are flagged and the
pooled evidence does not decide; a set on which every caption scores 0 carries no weight."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

ROLES = {"init": "target", "pre": "competitor", "par": "competitor", "none": "floor"}


def _synthetic_set(rng: np.random.Generator, images: int, effects: dict[str, float], seeds: int = 3,
                   noise: float = 0.15) -> pd.DataFrame:
    """Per-image scores: each image's difficulty (shared by every method), plus the method's effect, a small
    seed effect and noise per (run, image)."""
    difficulty = rng.gamma(2.0, 0.3, images)
    rows = []
    for method, effect in effects.items():
        for seed in range(seeds):
            shift = rng.normal(0, 0.005)
            for image, base in enumerate(difficulty):
                rows.append({"method": method, "config_rank": 1, "seed": seed, "image_id": image,
                             "CIDEr-D": base + effect + shift + rng.normal(0, noise)})
    return pd.DataFrame(rows)


def test_pooled_interval_of_agreeing_sets_is_narrower_than_each_sets_own():
    from analysis.pooled import pooled_verdict
    from analysis.verdict import compute_verdict

    rng = np.random.default_rng(6)
    # init and pre equally good on both collections (the second one harder), noisy per image.
    sets = {"flickr": _synthetic_set(rng, 150, {"init": 0.50, "pre": 0.50, "none": 0.1}, noise=0.4),
            "coco": _synthetic_set(rng, 150, {"init": 0.40, "pre": 0.40, "none": 0.1}, noise=0.4)}
    pooled = pooled_verdict(sets, roles=ROLES, margin=0.08, n_boot=2000)
    assert pooled.other == "pre" and not pooled.disagree and pooled.q_p > 0.05
    width = pooled.ci[1] - pooled.ci[0]
    table = pooled.sets
    for name, frame in sets.items():
        own = compute_verdict(frame, roles=ROLES, margin=0.08)  # each set's own single-set interval
        assert own.best_other == "pre"
        assert table.loc[name, "diff"] == pytest.approx(own.diff)
        assert width < own.ci[1] - own.ci[0] and width < table.loc[name, "hi"] - table.loc[name, "lo"], name
    # The pooled difference is the inverse-variance mean of the sets' differences, and its interval holds it.
    weights = 1 / table["se"] ** 2
    assert pooled.diff == pytest.approx(float((weights * table["diff"]).sum() / weights.sum()))
    assert table["weight"].sum() == pytest.approx(1.0) and pooled.ci[0] < pooled.diff < pooled.ci[1]
    # Neither set decides at this margin alone (each interval straddles -0.08); pooled, they do.
    assert set(table["verdict"]) == {"inconclusive"}
    assert pooled.verdict == "competes" and pooled.decides and "The pooled evidence decides" in pooled.text


def test_pooled_verdict_of_disagreeing_sets_says_the_answer_depends_on_the_photos():
    from analysis.pooled import pooled_verdict

    rng = np.random.default_rng(5)
    # init leads by 0.15 on one collection and trails by 0.15 on the other: each set decides, in opposite ways.
    sets = {"flickr": _synthetic_set(rng, 150, {"init": 0.65, "pre": 0.50}),
            "coco": _synthetic_set(rng, 150, {"init": 0.35, "pre": 0.50})}
    pooled = pooled_verdict(sets, roles=ROLES, margin=0.05)
    assert list(pooled.sets["verdict"]) == ["competes", "does not compete"]
    assert pooled.disagree and pooled.q_p < 1e-6
    # The pooled point estimate sits near 0 with a narrow interval, which would say "competes": it is not taken.
    assert abs(pooled.diff) < 0.05 and pooled.ci[0] > -0.05
    assert pooled.verdict == "inconclusive" and not pooled.decides
    assert "the answer depends on the photo collection" in pooled.text

    # Sets that differ in size of the effect but decide the same way on their own: that common word stands.
    same = {"flickr": _synthetic_set(rng, 150, {"init": 0.80, "pre": 0.50}),
            "coco": _synthetic_set(rng, 150, {"init": 0.55, "pre": 0.50})}
    agreeing_words = pooled_verdict(same, roles=ROLES, margin=0.05)
    assert agreeing_words.disagree and list(agreeing_words.sets["verdict"]) == ["competes", "competes"]
    assert agreeing_words.verdict == "competes" and "each set decides the same way on its own" in agreeing_words.text


def test_a_set_on_which_every_caption_scores_zero_carries_no_weight_in_the_pooled_interval():
    from analysis.pooled import pooled_verdict

    rng = np.random.default_rng(7)
    informative = _synthetic_set(rng, 100, {"init": 0.50, "pre": 0.45})
    blind = informative.assign(**{"CIDEr-D": 0.0})  # models that cannot describe these photos: all zero
    pooled = pooled_verdict({"flickr": informative, "coco": blind}, roles=ROLES, margin=0.05)
    assert pooled.sets.loc["coco", "weight"] == 0 and pooled.sets.loc["flickr", "weight"] == 1
    assert pooled.diff == pytest.approx(pooled.sets.loc["flickr", "diff"])
    assert pooled.ci == (pooled.sets.loc["flickr", "lo"], pooled.sets.loc["flickr", "hi"])
    assert "coco: init - pre is the same in every resample" in pooled.text and "Cochran" not in pooled.text
    # Nearly zero instead (a floor, not exactly 0): a tiny variance, so nearly all the weight, and the text says so.
    floor = informative.assign(**{"CIDEr-D": informative["CIDEr-D"] * 1e-4})
    dominated = pooled_verdict({"flickr": informative, "coco": floor}, roles=ROLES, margin=0.05)
    assert dominated.sets.loc["coco", "weight"] > 0.99
    assert "coco carries 100% of the weight, so the pooled interval is essentially its own" in dominated.text


def test_the_pooled_chi_square_tail_matches_scipy():
    from scipy.stats import chi2

    from analysis.pooled import chi2_sf

    for x in (0.2, 1.0, 3.84, 9.0, 25.0):
        for dof in range(1, 7):
            assert chi2_sf(x, dof) == pytest.approx(chi2.sf(x, dof), abs=1e-12)
