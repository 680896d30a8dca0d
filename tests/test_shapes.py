"""The generated shapes dataset: deterministic, split 80/10/10, captions that are true of the picture."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from study.config import ShapesDataset
from study.data.karpathy import load_karpathy
from study.data.scenes import COLOURS, Scene, render_scene
from study.data.shapes import describe, ensure_shapes, generate_shapes, shapes_dir, split_sizes

# The test's own reading of the grammar (kept apart from the generator's tables on purpose).
NOUNS = {"circle": "circle", "disc": "circle", "square": "square", "triangle": "triangle", "star": "star",
         "cross": "cross", "diamond": "diamond", "rhombus": "diamond"}
PLURAL_NOUNS = {"crosses": "cross", "rhombuses": "rhombus"}
SIZES = {"small": "small", "little": "small", "tiny": "small", "big": "large", "large": "large"}
COUNTS = {"a": 1, "an": 1, "two": 2, "three": 3}
RELATION = r"(above|below|to the left of|to the right of)"
COLOUR_WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "white")
NP = re.compile(rf"\b(a|an|two|three) (?:(small|little|tiny|big|large) )?({'|'.join(COLOUR_WORDS)}) (\w+)")


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _noun_phrases(caption: str) -> list[tuple[int, str | None, str, str]]:
    """(count, size or None, colour, shape) of each noun phrase, in caption order."""
    out = []
    for count, size, colour, noun in NP.findall(caption):
        if COUNTS[count] > 1:
            noun = PLURAL_NOUNS.get(noun, noun[:-1])
        assert noun in NOUNS, f"{noun!r} is not a shape noun in {caption!r}"
        out.append((COUNTS[count], SIZES[size] if size else None, colour, NOUNS[noun]))
    return out


def _holds(a, b, relation: str) -> bool:
    """a <relation> b, by the dominant axis of the centres (image y grows downwards)."""
    dx, dy = b.x - a.x, b.y - a.y
    return {"above": dy > abs(dx), "below": -dy > abs(dx),
            "to the left of": dx > abs(dy), "to the right of": -dx > abs(dy)}[relation]


def _check_caption(caption: str, scene: Scene) -> None:
    phrases = _noun_phrases(caption)
    groups = scene.groups()
    # Every object is mentioned exactly once, with the right colour, shape, count and (if said) size.
    said = Counter((colour, shape, count) for count, _, colour, shape in phrases)
    assert said == Counter((c, s, n) for c, s, _, n in groups), (caption, groups)
    size_of = {(c, s): z for c, s, z, _ in groups}
    for _, size, colour, shape in phrases:
        assert size in (None, size_of[(colour, shape)]), (caption, groups)

    rel = re.search(RELATION, caption)
    assert (rel is not None) == (scene.relation is not None), (caption, scene)
    if rel is not None:
        first, second = phrases
        if caption.startswith(rel.group(1)):  # "below a blue square there is a red circle"
            first, second = second, first
        find = {(o.colour, o.shape): o for o in scene.objects}
        a, b = find[first[2:]], find[second[2:]]
        assert _holds(a, b, rel.group(1)), (caption, a, b)


def test_captions_agree_with_scene_for_many_scenes():
    rng = np.random.default_rng(123)
    kinds = Counter()
    for _ in range(400):
        img, scene = render_scene(rng, 96)
        captions = describe(scene, rng)
        assert len(captions) == 5 and len(set(captions)) == 5
        for caption in captions:
            _check_caption(caption, scene)
        # Objects never overlap, so the centre pixel shows the object's own colour (plus jitter/noise).
        arr = np.asarray(img, dtype=np.float32)
        for o in scene.objects:
            y, x = int(round(o.y)), int(round(o.x))
            patch = arr[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(0)
            assert np.abs(patch - COLOURS[o.colour]).max() < 40, (o, patch)
        for i, o in enumerate(scene.objects):
            for p in scene.objects[:i]:
                assert np.hypot(o.x - p.x, o.y - p.y) > o.radius + p.radius
        kinds[len(scene.objects), scene.relation, max(n for *_, n in scene.groups())] += 1
    # Every kind of scene occurs: 1-3 objects, all four relations, counts of two and three.
    assert {(2, r, 1) for r in ("above", "below", "to the left of", "to the right of")} <= kinds.keys()
    assert {(1, None, 1), (2, None, 2), (3, None, 1), (3, None, 2), (3, None, 3)} <= kinds.keys()


def test_generation_is_deterministic_and_split_80_10_10(tmp_path):
    a = generate_shapes(tmp_path / "a", images=30, seed=0, image_size=64, progress=False)
    b = generate_shapes(tmp_path / "b", images=30, seed=0, image_size=64, progress=False)
    c = generate_shapes(tmp_path / "c", images=30, seed=1, image_size=64, progress=False)
    ha, hb, hc = _hashes(a.parent), _hashes(b.parent), _hashes(c.parent)
    assert len(ha) == 31 and ha == hb  # 30 PNGs + dataset.json, byte-identical
    assert ha["dataset.json"] != hc["dataset.json"]
    assert sum(ha[k] != hc[k] for k in ha) >= 30  # another seed changes (nearly) everything

    data = json.loads(a.read_text())
    assert data["dataset"] == "shapes"
    assert Counter(e["split"] for e in data["images"]) == {"train": 24, "val": 3, "test": 3}
    assert split_sizes(1000) == (800, 100, 100) and split_sizes(1234) == (988, 123, 123)
    entry = data["images"][0]
    assert entry["filepath"] == "images" and (a.parent / "images" / entry["filename"]).is_file()
    assert len({s["raw"] for s in entry["sentences"]}) == 5
    assert entry["sentids"] == [s["sentid"] for s in entry["sentences"]] == [0, 1, 2, 3, 4]
    assert Image.open(a.parent / "images" / entry["filename"]).size == (64, 64)

    ds = load_karpathy(a)  # the reader takes it as any Karpathy dataset
    assert [len(ds.split(s)) for s in ("train", "val", "test")] == [24, 3, 3]
    assert all(len(r.captions) == 5 for r in ds.records)


def test_ensure_shapes_generates_once_and_ignores_partial_folders(tmp_path):
    cfg = ShapesDataset(images=30, seed=3, image_size=48, cache_dir=tmp_path)
    folder = shapes_dir(tmp_path, 30, 3, 48)
    assert folder == tmp_path / "shapes" / "n30-s3-px48-v1"
    # An interrupted run leaves images but no dataset.json: it must not count as done.
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "00000.png").write_bytes(b"half")
    path = ensure_shapes(cfg, progress=False)
    assert path == folder / "dataset.json" and path.is_file()
    assert len(list((folder / "images").glob("*.png"))) == 30
    assert not list(tmp_path.joinpath("shapes").glob("*.partial-*"))
    stamp = path.stat().st_mtime_ns
    assert ensure_shapes(cfg, progress=False) == path and path.stat().st_mtime_ns == stamp  # reused
