"""Feature extraction (study.data.encoders) and its disk cache (study.data.features): hit/miss, keys, crash-safe
resume, bad images, real photos.

Most tests use a tiny seeded conv "encoder" on generated images; two use the real EfficientNet-Lite0 on
Flickr8k photos (skipped when the shared data folder is absent).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from study.data import encoders as E
from study.data import features as F

DATA = Path(__file__).parents[1].parent / "shared/data/flickr8k-1k"
TINY = "tiny_test_encoder"


@pytest.fixture(autouse=True)
def _one_thread():
    """The machine's 2 cores are shared: keep torch on one thread here, and restore it afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _TinyGrid(torch.nn.Module):
    """(B, 3, 32, 32) -> (B, 8, 2, 2): one seeded 16x16/16 conv + ReLU, deterministic across builds."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=16, stride=16)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * 0.05)
            self.conv.bias.copy_(torch.randn(8, generator=gen) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


@pytest.fixture
def tiny(monkeypatch):
    """Registers the tiny encoder; ``builds`` counts how often the CNN was built."""
    builds = []

    def build() -> torch.nn.Module:
        builds.append(1)
        return _TinyGrid()

    spec = E.EncoderSpec(name=TINY, feature_dim=8, grid_size=2, image_size=32, mean=(0.5, 0.5, 0.5),
                         std=(0.25, 0.25, 0.25), build=build, version="1")
    monkeypatch.setitem(E.ENCODERS, TINY, spec)
    return spec, builds


def _images(folder: Path, n: int) -> list[tuple[str, Path]]:
    """n small random RGB PNGs of varied aspect ratio, as (key, path) items."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        h, w = 40 + 3 * i, 56 - 2 * i
        path = folder / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        items.append((path.name, path))
    return items


def test_miss_then_hit_reuses_without_building_the_cnn(tmp_path, tiny, monkeypatch):
    spec, builds = tiny
    items = _images(tmp_path / "img", 10)
    cache = F.extract_features(items, encoder=TINY, cache_dir=tmp_path / "cache", fingerprint="fp",
                               batch_size=4, progress=False, num_workers=2)
    assert (cache.reused, cache.computed, len(builds)) == (False, 10, 1)
    assert cache.pooled.shape == (10, 8) and cache.grid.shape == (10, 4, 8)
    assert cache.pooled.dtype == np.float16 and cache.grid.dtype == np.float16
    assert isinstance(cache.pooled, np.memmap) and isinstance(cache.grid, np.memmap)
    assert cache.keys == [k for k, _ in items] and cache.failed == []
    assert cache.nbytes == 10 * 8 * 2 + 10 * 4 * 8 * 2
    assert cache.path == tmp_path / "cache" / "features" / TINY / F.feature_cache_key("fp", spec)
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["complete"] is True and meta["n"] == 10 and meta["spec_version"] == "1"
    assert not (cache.path.parent / f"{cache.path.name}.partial").exists()

    # Row i is image i; grid positions are row-major (r, c) -> r*g + c; pooled is the grid's mean.
    x = torch.from_numpy(E.preprocess(Image.open(items[7][1]), spec))[None]
    with torch.no_grad():
        fmap = _TinyGrid()(x)[0]  # (8, 2, 2)
    np.testing.assert_allclose(cache.grid[7, 1], fmap[:, 0, 1].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(cache.grid[7, 2], fmap[:, 1, 0].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(cache.pooled.astype(np.float32), cache.grid.astype(np.float32).mean(1),
                               atol=2e-3)
    assert np.abs(cache.pooled).sum(1).min() > 0  # every row was written

    # Second call: same folder, no CNN built (a build would raise), identical numbers.
    monkeypatch.setitem(E.ENCODERS, TINY, dataclasses.replace(spec, build=_raise_if_built))
    again = F.extract_features(items, encoder=TINY, cache_dir=tmp_path / "cache", fingerprint="fp",
                               progress=False)
    assert (again.reused, again.computed, again.path) == (True, 0, cache.path)
    np.testing.assert_array_equal(again.grid, cache.grid)

    # The same fingerprint for a different image list is an error, not silently wrong rows.
    with pytest.raises(ValueError, match="differ from the ones asked for"):
        F.extract_features(items[:5], encoder=TINY, cache_dir=tmp_path / "cache", fingerprint="fp",
                           progress=False)


def _raise_if_built() -> torch.nn.Module:
    raise AssertionError("the CNN was built although the cache is complete")


def test_cache_key_changes_with_fingerprint_version_and_preprocessing(tiny):
    spec, _ = tiny
    base = F.feature_cache_key("abc", spec)
    assert base == F.feature_cache_key("abc", dataclasses.replace(spec, build=lambda: None))
    assert len(base) == 16 and int(base, 16) >= 0
    changed = [F.feature_cache_key("abd", spec),
               F.feature_cache_key("abc", dataclasses.replace(spec, version="2")),
               F.feature_cache_key("abc", dataclasses.replace(spec, mean=(0.4, 0.5, 0.5))),
               F.feature_cache_key("abc", dataclasses.replace(spec, image_size=64)),
               F.feature_cache_key("abc", dataclasses.replace(spec, interpolation="bilinear"))]
    assert len({base, *changed}) == 6


def test_interrupted_extraction_is_not_complete_and_resumes(tmp_path, tiny, monkeypatch):
    spec, builds = tiny
    items = _images(tmp_path / "img", 10)
    reference = F.extract_features(items, encoder=TINY, cache_dir=tmp_path / "ref", fingerprint="fp",
                                   batch_size=3, progress=False)

    # Crash while loading image 6 = first image of the third batch (batch size 3): two batches are done.
    real_load = F._load_image

    def crashing_load(path: Path) -> Image.Image:
        if Path(path).name == "img06.png":
            raise RuntimeError("simulated crash")
        return real_load(path)

    monkeypatch.setattr(F, "_load_image", crashing_load)
    cache_dir = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="simulated crash"):
        F.extract_features(items, encoder=TINY, cache_dir=cache_dir, fingerprint="fp", batch_size=3,
                           progress=False, num_workers=2)
    key = F.feature_cache_key("fp", spec)
    folder = cache_dir / "features" / TINY
    assert not (folder / key).exists()  # nothing that looks complete
    partial = folder / f"{key}.partial"
    assert json.loads((partial / "progress.json").read_text())["rows_done"] == 6
    assert not (partial / "meta.json").exists()

    monkeypatch.setattr(F, "_load_image", real_load)
    resumed = F.extract_features(items, encoder=TINY, cache_dir=cache_dir, fingerprint="fp", batch_size=3,
                                 progress=False)
    assert (resumed.reused, resumed.computed) == (False, 4)  # only rows 6..9 were encoded
    assert not partial.exists() and resumed.path == folder / key
    np.testing.assert_array_equal(resumed.grid, reference.grid)
    np.testing.assert_array_equal(resumed.pooled, reference.pooled)


def test_corrupt_or_missing_image_errors_or_is_skipped(tmp_path, tiny):
    items = _images(tmp_path / "img", 6)
    (tmp_path / "img" / "img02.png").write_bytes(b"not an image at all")
    items[4] = ("gone.png", tmp_path / "img" / "gone.png")

    with pytest.raises(F.ImageReadError, match="img02.png"):
        F.extract_features(items, encoder=TINY, cache_dir=tmp_path / "c1", fingerprint="fp", batch_size=4,
                           progress=False)

    cache = F.extract_features(items, encoder=TINY, cache_dir=tmp_path / "c2", fingerprint="fp",
                               batch_size=4, progress=False, on_error="skip")
    assert cache.failed == ["img02.png", "gone.png"] and cache.computed == 4
    assert not cache.grid[[2, 4]].any() and not cache.pooled[[2, 4]].any()
    assert np.abs(cache.pooled[[0, 1, 3, 5]].astype(np.float32)).sum(1).min() > 0
    # A cache with unreadable images does not satisfy a caller who wants errors.
    with pytest.raises(F.ImageReadError, match="img02.png"):
        F.extract_features(items, encoder=TINY, cache_dir=tmp_path / "c2", fingerprint="fp",
                           progress=False, on_error="error")


def test_unknown_encoder_lists_valid_names():
    with pytest.raises(KeyError, match="efficientnet_lite0"):
        E.get_encoder("vgg16")


def test_preprocess_resizes_shorter_side_and_centre_crops():
    spec = E.get_encoder("efficientnet_lite0")
    # A wide image: left third black, middle white, right third black; the centre crop sees only white.
    img = np.zeros((300, 900, 3), np.uint8)
    img[:, 300:600] = 255
    x = E.preprocess(Image.fromarray(img), spec)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    # 255 under mean 127/std 128 -> (255 - 127) / 128 = 1.0
    np.testing.assert_allclose(x[:, 10:-10, 10:-10], 1.0, atol=1e-5)


def _dog_photos(n: int) -> list[Path]:
    data = json.loads((DATA / "dataset_flickr8k.json").read_text())["images"]
    names = sorted(i["filename"] for i in data if all("dog" in s["raw"].lower() for s in i["sentences"]))
    return [DATA / "images" / name for name in names[:n]]


needs_data = pytest.mark.skipif(not (DATA / "dataset_flickr8k.json").is_file(), reason=f"{DATA} absent")


@pytest.mark.realdata
@needs_data
def test_tf_normalisation_makes_dog_photos_dogs():
    """The Lite0 weights expect mean 127 / std 128 (TF EfficientNet-Lite), not ImageNet mean/std."""
    spec = E.get_encoder("efficientnet_lite0")
    imagenet = dataclasses.replace(spec, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    model = E.efficientnet_lite0_classifier()
    photos = _dog_photos(16)
    dog_mass, top5_hits = {}, {}
    for name, s in (("tf", spec), ("imagenet", imagenet)):
        x = torch.from_numpy(np.stack([E.preprocess(Image.open(p), s) for p in photos]))
        with torch.inference_mode():
            probs = model(x.contiguous(memory_format=torch.channels_last)).softmax(-1)  # (16, 1000)
        top5 = probs.topk(5).indices
        top5_hits[name] = int(((top5 >= 151) & (top5 <= 268)).any(1).sum())  # ImageNet dog breeds
        dog_mass[name] = float(probs[:, 151:269].sum(1).mean())
    assert top5_hits["tf"] >= 15, top5_hits
    assert dog_mass["tf"] > 0.65 and dog_mass["tf"] > dog_mass["imagenet"] + 0.05, dog_mass


@pytest.mark.realdata
@needs_data
def test_real_photos_extract_and_reuse(tmp_path):
    photos = sorted((DATA / "images").glob("*.jpg"))[:24]
    items = [(p.name, p) for p in photos]
    cache = F.extract_features(items, cache_dir=tmp_path, fingerprint="flickr-24", batch_size=12,
                               progress=False)
    assert cache.encoder == "efficientnet_lite0" and cache.computed == 24
    assert cache.pooled.shape == (24, 1280) and cache.grid.shape == (24, 49, 1280)
    grid = cache.grid.astype(np.float32)
    assert np.isfinite(grid).all() and grid.min() >= 0 and grid.max() <= 6.01  # ReLU6 activations
    pooled = cache.pooled.astype(np.float32)
    # Different photos give clearly different vectors: mean pairwise cosine well below 1.
    unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    cos = unit @ unit.T
    assert cos[~np.eye(24, dtype=bool)].mean() < 0.8
    again = F.extract_features(items, cache_dir=tmp_path, fingerprint="flickr-24", progress=False)
    assert again.reused and again.computed == 0


@pytest.mark.realdata
@needs_data
def test_a_captioned_photo_gets_exactly_the_cached_features(tmp_path):
    """`study caption` encodes a file through the cache's own code (float16 grid, pooled from it): the model
    sees the very numbers it was trained on, whatever the batch the photo arrives in."""
    from study.trial.inference import image_features

    photos = sorted((DATA / "images").glob("*.jpg"))[:3]
    cache = F.extract_features([(p.name, p) for p in photos], cache_dir=tmp_path, fingerprint="flickr-3",
                               batch_size=2, progress=False)
    spec = E.get_encoder("efficientnet_lite0")
    encoder = E.load_encoder(spec, torch.device("cpu"))
    grid, pooled = image_features(photos, encoder, spec, torch.device("cpu"))  # (3, 49, 1280), (3, 1280)
    assert grid.dtype == pooled.dtype == np.float16
    np.testing.assert_array_equal(grid, cache.grid)
    np.testing.assert_array_equal(pooled, cache.pooled)
    alone_grid, alone_pooled = image_features(photos[2:], encoder, spec, torch.device("cpu"))
    np.testing.assert_array_equal(alone_grid[0], cache.grid[2])
    np.testing.assert_array_equal(alone_pooled[0], cache.pooled[2])
