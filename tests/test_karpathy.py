"""The Karpathy-split reader on small datasets made here, every bad input, image decoding, real Flickr8k."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from study.data.karpathy import DatasetError, load_image, load_karpathy

FLICKR8K = Path(__file__).parents[1].parent / "shared/data/flickr8k-1k"


def _entry(filename: str, split: str = "train", captions=("A dog runs .", "a brown dog"), **extra) -> dict:
    return {"filename": filename, "split": split, "sentences": [{"raw": c} for c in captions], **extra}


def _write(tmp_path: Path, entries: list, images=None) -> Path:
    """dataset.json + a 4x4 PNG for each filename in ``images`` (default: every entry's) under images/."""
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    names = images if images is not None else [
        e["filename"] for e in entries if isinstance(e, dict) and "filename" in e]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (10, 20, 30)).save(root / name, format="PNG")
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"dataset": "tiny", "images": entries}))
    return path


def test_reads_splits_paths_and_captions(tmp_path):
    entries = [
        _entry("a.png"),
        _entry("b.png", "val", filepath="val2014"),  # COCO-style: root/filepath/filename
        _entry("c.png", "test", filepath="test2014"),  # no test2014 folder: root/filename is accepted
        {"filename": "d.png", "split": "restval", "sentences": [{"tokens": ["a", "red", "bus"]}]},
    ]
    path = _write(tmp_path, entries, images=["a.png", "val2014/b.png", "c.png", "d.png"])
    ds = load_karpathy(path)
    root = (tmp_path / "images").resolve()
    assert ds.name == "tiny" and ds.images_root == root and ds.skipped == ()
    assert [r.path for r in ds.records] == [root / "a.png", root / "val2014/b.png", root / "c.png", root / "d.png"]
    assert ds.records[0].captions == ("A dog runs .", "a brown dog")
    assert ds.records[3].captions == ("a red bus",)  # tokens joined when raw is missing
    assert [r.filename for r in ds.split("train")] == ["a.png", "d.png"]  # restval folded into train
    assert [len(ds.split(s)) for s in ("val", "test", "restval")] == [1, 1, 0]

    keep = load_karpathy(path, restval="keep")
    assert [r.filename for r in keep.split("restval")] == ["d.png"] and len(keep.split("train")) == 1
    drop = load_karpathy(path, restval="drop")
    assert [r.filename for r in drop.records] == ["a.png", "b.png", "c.png"]

    # An explicit images_root, elsewhere.
    other = tmp_path / "elsewhere"
    (tmp_path / "images").rename(other)
    assert load_karpathy(path, other).records[1].path == other.resolve() / "val2014/b.png"
    with pytest.raises(ValueError, match="restval must be one of"):
        load_karpathy(path, other, restval="fold")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        ds.split("dev")


BAD_ENTRIES = {
    "lacks filename": ({"split": "train", "sentences": [{"raw": "x"}]}, "lacks the key 'filename'"),
    "lacks split": ({"filename": "b.png", "sentences": [{"raw": "x"}]}, "lacks the key 'split'"),
    "lacks sentences": ({"filename": "b.png", "split": "train"}, "lacks the key 'sentences'"),
    "unknown split": (_entry("b.png", "dev"), "unknown split 'dev'; allowed: ['train', 'val', 'test', 'restval']"),
    "empty captions": (_entry("b.png", captions=()), "no captions"),
    "blank caption": (_entry("b.png", captions=("  ",)), "no captions"),
    "sentence without raw": ({"filename": "b.png", "split": "val", "sentences": [{"imgid": 1}]},
                             "sentences[0] has neither 'raw' nor 'tokens'"),
    "missing image": (_entry("b.png"), "b.png does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_ENTRIES))
def test_bad_entry_names_file_index_filename_and_problem(tmp_path, case):
    bad, problem = BAD_ENTRIES[case]
    images = ["a.png"] + (["b.png"] if case != "missing image" else [])
    path = _write(tmp_path, [_entry("a.png"), bad], images=images)
    with pytest.raises(DatasetError) as err:
        load_karpathy(path)
    msg = str(err.value)
    assert str(path) in msg and "images[1]" in msg and problem in msg
    if "filename" in bad:
        assert "(b.png)" in msg


def test_skip_mode_counts_per_entry_problems_but_structure_still_raises(tmp_path):
    entries = [_entry("a.png"), _entry("gone.png"), _entry("b.png", captions=()), _entry("c.png", "dev"),
               _entry("d.png", "val")]
    path = _write(tmp_path, entries, images=["a.png", "b.png", "c.png", "d.png"])
    ds = load_karpathy(path, on_error="skip")
    assert [r.filename for r in ds.records] == ["a.png", "d.png"]
    assert [name for name, _ in ds.skipped] == ["gone.png", "b.png", "c.png"]
    assert "does not exist" in ds.skipped[0][1] and "no captions" in ds.skipped[1][1] and "dev" in ds.skipped[2][1]

    path.write_text(json.dumps({"images": [_entry("a.png"), {"filename": "a.png", "sentences": []}]}))
    with pytest.raises(DatasetError, match=r"images\[1\] \(a.png\): entry lacks the key 'split'"):
        load_karpathy(path, on_error="skip")


@pytest.mark.parametrize(
    "content, problem",
    [("{not json", "not valid JSON"), ("[1, 2]", "'images' list"), ('{"images": {}}', "'images' list"),
     ('{"dataset": "x"}', "'images' list")],
)
def test_structural_problems_always_raise(tmp_path, content, problem):
    path = tmp_path / "broken.json"
    path.write_text(content)
    (tmp_path / "images").mkdir()
    for on_error in ("error", "skip"):
        with pytest.raises(DatasetError, match=problem) as err:
            load_karpathy(path, on_error=on_error)
        assert str(path) in str(err.value)
    with pytest.raises(DatasetError, match="does not exist"):
        load_karpathy(tmp_path / "absent.json")


def test_fingerprint_changes_with_content(tmp_path):
    path = _write(tmp_path, [_entry("a.png"), _entry("b.png", "restval")])
    fp = load_karpathy(path).fingerprint()
    assert load_karpathy(path).fingerprint() == fp  # stable
    assert load_karpathy(path, restval="keep").fingerprint() != fp  # another split assignment
    image = tmp_path / "images" / "b.png"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched (or copied, re-mounted) only
    assert load_karpathy(path).fingerprint() == fp
    data = bytearray(image.read_bytes())
    data[-1] ^= 1  # same size, same mtime, other bytes
    image.write_bytes(bytes(data))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    fp2 = load_karpathy(path).fingerprint()
    assert fp2 != fp
    path.write_text(path.read_text().replace("brown", "black"))  # a caption edited
    assert load_karpathy(path).fingerprint() not in (fp, fp2)


def _saved(tmp_path: Path, img: Image.Image, name: str, **kw) -> Path:
    path = tmp_path / name
    img.save(path, **kw)
    return path


def test_load_image_converts_every_mode_to_rgb(tmp_path):
    grey = Image.new("L", (3, 2), 77)
    palette = Image.new("P", (3, 2), 1)
    palette.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    trans_palette = palette.copy()
    trans_palette.info["transparency"] = 1  # palette index 1 is see-through
    rgba = Image.new("RGBA", (3, 2), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent pixel
    deep = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    cases = {
        "grey.png": (grey, (77, 77, 77)),
        "la.png": (Image.new("LA", (3, 2), (0, 0)), (255, 255, 255)),
        "pal.png": (palette, (200, 10, 20)),
        "tpal.png": (trans_palette, (255, 255, 255)),
        "rgba.png": (rgba, (255, 255, 255)),
        "cmyk.jpg": (Image.new("CMYK", (3, 2), (0, 0, 0, 0)), (255, 255, 255)),
        "deep.png": (deep, (0, 0, 0)),
        "bits.png": (Image.new("1", (3, 2), 1), (255, 255, 255)),
    }
    for name, (img, first_pixel) in cases.items():
        path = _saved(tmp_path, img, name)
        out = load_image(path)
        assert out.mode == "RGB" and out.size == img.size, name
        assert np.abs(np.asarray(out)[0, 0].astype(int) - first_pixel).max() <= 2, (name, np.asarray(out)[0, 0])
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # the 16-bit case really is 16-bit
    deep_rgb = np.asarray(load_image(tmp_path / "deep.png"))[0, :, 0]
    assert deep_rgb.tolist() == [0, 128, 255]  # scaled, not clipped to white
    assert np.asarray(load_image(tmp_path / "rgba.png"))[1, 1].tolist() == [255, 0, 0]


def test_load_image_corrupt_truncated_missing_name_the_file(tmp_path):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    good = _saved(tmp_path, noise, "good.jpg", quality=90)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG not really an image")
    for path in (truncated, garbage, tmp_path / "missing.jpg"):
        with pytest.raises(DatasetError) as err:
            load_image(path)
        assert str(path) in str(err.value)
    assert load_image(good).size == (64, 64)


@pytest.mark.realdata
def test_real_flickr8k_subset_loads():
    json_path = FLICKR8K / "dataset_flickr8k.json"
    if not json_path.is_file():
        pytest.skip(f"{FLICKR8K} is not here")
    ds = load_karpathy(json_path)
    assert ds.name == "flickr8k" and len(ds.records) == 991 and ds.skipped == ()
    assert [len(ds.split(s)) for s in ("train", "val", "test")] == [753, 113, 125]
    assert all(len(r.captions) == 5 and r.path.is_file() for r in ds.records)
    assert load_image(ds.records[0].path).mode == "RGB"
    assert len(ds.fingerprint()) == 64


@pytest.mark.parametrize("entry", [_entry("../../outside.png", filepath="."), _entry("outside.png", filepath="../.."),
                                   _entry("/tmp/outside.png")], ids=["filename ..", "filepath ..", "absolute"])
def test_an_entry_naming_a_file_outside_images_root_is_refused_even_when_skipping(tmp_path, entry):
    """A crafted entry (`filepath: ../../..` or an absolute filename) was read, encoded and could end up
    embedded in report.html; the file exists, so only the path check stops it."""
    outside = tmp_path.parent / "outside.png"
    Image.new("RGB", (4, 4)).save(outside)
    Image.new("RGB", (4, 4)).save("/tmp/outside.png")
    path = _write(tmp_path, [_entry("a.png"), entry], images=["a.png"])
    for on_error in ("error", "skip"):
        with pytest.raises(DatasetError, match=r"images\[1\] .*leads outside images_root"):
            load_karpathy(path, on_error=on_error)
