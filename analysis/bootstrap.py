"""The bootstrap behind every interval of the verdict: one resample plan, so a difference has one interval.

A resample is encoded as counts (how often each seed or test image was drawn). Which counts a resample draws
does not depend on what else is computed beside it: a set's image resample comes from a generator seeded with
``(seed, the set's name)`` and a method's seed resample from one seeded with ``(seed, the method's name, its
number of seeds)``. So the single-set verdict, the "target minus each method" tables and the pooled verdict over
several sets draw the very same resamples for the same set and method, and print the same interval for the same
difference; and a reader who has the per-image scores and the recorded settings (``n_boot``, ``seed``, ``level``,
the set's name) recomputes every interval exactly (``study verify``).

Two methods' seeds are resampled apart (seed 0 of one has nothing to do with seed 0 of another); one method's
seed resample is shared by every set (the same checkpoints score each set: a lucky seed is lucky everywhere);
images are resampled once per set and shared by every method there (paired).
"""

from __future__ import annotations

import math
import zlib

import numpy as np

IMAGES, SEEDS = 0, 1  # the first word of a generator's key: what it resamples


def _generator(seed: int, what: int, name: str, *extra: int) -> np.random.Generator:
    """A generator for one resampled thing, keyed by its name (crc32: stable across runs and machines)."""
    return np.random.default_rng([int(seed), what, zlib.crc32(name.encode()), *extra])


def resample_weights(rng: np.random.Generator, n_boot: int, n: int) -> np.ndarray:
    """(n_boot, n) bootstrap weights: how often each of n items was drawn in each resample, divided by n."""
    draws = rng.integers(0, n, size=(n_boot, n)) + np.arange(n_boot)[:, None] * n  # row-offset indices
    return np.bincount(draws.ravel(), minlength=n_boot * n).reshape(n_boot, n) / n


def image_weights(seed: int, set_name: str, n_boot: int, n_images: int) -> np.ndarray:
    """(n_boot, n_images): the image resample of test set ``set_name`` (images in sorted id order)."""
    return resample_weights(_generator(seed, IMAGES, set_name), n_boot, n_images)


def seed_weights(seed: int, method: str, n_boot: int, n_seeds: int) -> np.ndarray:
    """(n_boot, n_seeds): the seed resample of ``method`` (seeds in sorted order), the same on every set."""
    return resample_weights(_generator(seed, SEEDS, method, n_seeds), n_boot, n_seeds)


def boot_means(blocks: list[np.ndarray], seed_ws: list[np.ndarray], image_w: np.ndarray) -> list[np.ndarray]:
    """Bootstrap means, (B,) each, of (S_k, N) score blocks for seed weights (B, S_k) and image weights (B, N).

    The resampled mean is ``sum_s sum_n c_s w_n x_sn / sum_s sum_n c_s w_n [x_sn present]``. Every block's rows
    (and their presence masks) are stacked so that all methods and metrics cost one (B, N) @ (N, R) product. NaN
    entries (METEOR without Java, a missing image) drop out of both sums.
    """
    present = [~np.isnan(x) for x in blocks]
    stacked = np.concatenate([np.where(p, x, 0.0) for p, x in zip(present, blocks)]
                             + [p.astype(float) for p in present])  # (2R, N)
    per_row = image_w @ stacked.T  # (B, 2R): each row's image-weighted sum per resample
    num_all, den_all = np.split(per_row, 2, axis=1)
    out, start = [], 0
    for x, seed_w in zip(blocks, seed_ws):
        stop = start + x.shape[0]
        num = np.einsum("bs,bs->b", seed_w, num_all[:, start:stop])
        den = np.einsum("bs,bs->b", seed_w, den_all[:, start:stop])
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(num / den)
        start = stop
    return out


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of ``samples`` at ``level`` (NaN resamples left out; NaN when none is finite)."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return (math.nan, math.nan)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return (float(lo), float(hi))
