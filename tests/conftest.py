"""Shared fixtures: a small `shapes` dataset prepared once per test session (real generator, real CNN), and the
real Flickr8k sample where it exists. The helpers the test modules share are in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import FLICKR

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def feature_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def small_shapes(feature_cache_dir):
    """A 200-image shapes dataset config (160 train / 20 val / 20 test) cached for the session."""
    from study.config import ShapesDataset

    return ShapesDataset(images=200, image_size=64, seed=3, cache_dir=feature_cache_dir)


@pytest.fixture(scope="session")
def small_prepared(small_shapes):
    """The small shapes dataset read, featurised (pooled + grid) and tokenised (word and char)."""
    from study.data.prepare import TokenSetting, prepare

    return prepare(small_shapes, [TokenSetting("word", 20, 1), TokenSetting("char", 100, 1)], progress=False)


@pytest.fixture(scope="session")
def flickr_dir() -> Path:
    if not (FLICKR / "dataset_flickr8k.json").is_file():
        pytest.skip(f"real data not found at {FLICKR}")
    return FLICKR
