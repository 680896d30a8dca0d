"""The embedded ``shapes`` dataset: rendered scenes of 1-3 coloured shapes, 5 grammar captions each.

It exists so the whole study runs (and its tests learn something) without downloading anything. It is
built so a captioner can only be right by looking: the colour, the shape, the size, the count and the
spatial relation of the objects are drawn independently, so no caption is guessable from the others.

- 1 object:                     "a big red circle", "there is a small blue star", ...
- 2 different objects:          one relation, "a red disc above a green square" /
                                "to the left of a blue cross there is a yellow triangle"
- 2 or 3 repeats of one object: counts, "two red triangles", "three small orange stars"
- 3 objects with other repeats: lists, "two red triangles and a blue circle"

Output is a folder in the Karpathy-split JSON format (``dataset.json`` + ``images/*.png``) so the same
reader (:mod:`study.data.karpathy`) loads it as Flickr8k or COCO. Generation is deterministic: each image
has its own sub-seed, PNGs carry no timestamps, so the same options give byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from study.config import ShapesDataset
from study.data.scenes import Scene, render_scene
from study.data.tokens import word_tokens
from study.progress import interactive

GENERATOR_VERSION = 1  # part of the cache folder name: bump when scenes, rendering or grammar change

# --- the grammar ---------------------------------------------------------------------------------------
SHAPE_NOUNS: dict[str, tuple[str, ...]] = {  # synonyms per shape
    "circle": ("circle", "disc"),
    "square": ("square",),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross",),
    "diamond": ("diamond", "rhombus"),
}
PLURALS = {"cross": "crosses", "rhombus": "rhombuses"}  # others add "s"
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("big", "large")}
COUNT_WORDS = {2: "two", 3: "three"}
INVERSE = {"above": "below", "below": "above", "to the left of": "to the right of", "to the right of": "to the left of"}
PREFIXES = ("", "a picture of ", "an image showing ", "an image of ", "there is ")  # "there is" agrees


# --- captions ------------------------------------------------------------------------------------------
def _noun_phrase(rng: np.random.Generator, colour: str, shape: str, size: str, count: int) -> str:
    """'a big red disc' / 'two small blue squares'; the size word is used about half of the time."""
    noun = str(rng.choice(SHAPE_NOUNS[shape]))
    if count > 1:
        noun = PLURALS.get(noun, noun + "s")
    words = [colour, noun]
    if rng.random() < 0.5:
        words.insert(0, str(rng.choice(SIZE_WORDS[size])))
    if count > 1:
        return " ".join([COUNT_WORDS[count], *words])
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def _caption(scene: Scene, rng: np.random.Generator) -> str:
    prefix = str(rng.choice(PREFIXES))
    if scene.relation is not None:
        a, b = scene.objects
        rel = scene.relation
        if rng.random() < 0.5:  # say it from the other object's side
            a, b, rel = b, a, INVERSE[rel]
        np_a = _noun_phrase(rng, a.colour, a.shape, a.size, 1)
        np_b = _noun_phrase(rng, b.colour, b.shape, b.size, 1)
        if rng.random() < 0.3:  # fronted relation: "above a green square there is a red circle"
            return f"{rel} {np_b} there is {np_a}"
        return f"{prefix}{np_a} {rel} {np_b}"
    groups = scene.groups()
    order = rng.permutation(len(groups))
    phrases = [_noun_phrase(rng, *groups[i]) for i in order]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if prefix == "there is " and groups[order[0]][3] > 1:
        prefix = "there are "  # agrees with the first noun phrase
    return prefix + body


def describe(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """``n`` different correct captions of ``scene``."""
    captions: list[str] = []
    for _ in range(1000):
        caption = _caption(scene, rng)
        if caption not in captions:
            captions.append(caption)
            if len(captions) == n:
                return captions
    raise RuntimeError(f"the grammar gave only {len(captions)} distinct captions for {scene}")


# --- the dataset on disk -------------------------------------------------------------------------------
def split_sizes(images: int) -> tuple[int, int, int]:
    """(train, val, test) counts of an 80/10/10 split."""
    val = test = round(images * 0.1)
    return images - val - test, val, test


def shapes_dir(cache_dir: Path, images: int, seed: int, image_size: int) -> Path:
    """The cache folder named by every option that changes its content."""
    return Path(cache_dir) / "shapes" / f"n{images}-s{seed}-px{image_size}-v{GENERATOR_VERSION}"


def generate_shapes(out_dir: Path, *, images: int = 1000, seed: int = 0, image_size: int = 128,
                    progress: bool = True) -> Path:
    """Write ``out_dir/dataset.json`` and ``out_dir/images/*.png`` (replacing ``out_dir``); returns the JSON path.

    Everything is written into a private ``<out_dir>.partial-<pid>`` folder that is renamed to ``out_dir``
    only when complete, so an interrupted run never looks finished.
    """
    return _generate(Path(out_dir), images, seed, image_size, progress, keep_existing=False)


def _generate(out_dir: Path, images: int, seed: int, image_size: int, progress: bool, keep_existing: bool) -> Path:
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)

    n_train, n_val, _ = split_sizes(images)
    order = np.random.default_rng([seed, images]).permutation(images)  # which image goes to which split
    splits = np.empty(images, dtype=object)
    splits[order[:n_train]] = "train"
    splits[order[n_train : n_train + n_val]] = "val"
    splits[order[n_train + n_val :]] = "test"

    width = max(5, len(str(images - 1)))
    entries = []
    for i in tqdm(range(images), desc="shapes", unit="img", disable=not progress or not interactive(), file=sys.stderr):
        rng = np.random.default_rng([seed, i])  # per-image sub-seed: image i never depends on the others
        img, scene = render_scene(rng, image_size)
        filename = f"{i:0{width}d}.png"
        # fast: noise does not compress; no timestamp
        img.save(tmp / "images" / filename, format="PNG", compress_level=1)
        captions = describe(scene, rng)
        sentids = list(range(5 * i, 5 * i + len(captions)))
        entries.append(
            {
                "filename": filename,
                "filepath": "images",
                "split": splits[i],
                "imgid": i,
                "sentids": sentids,
                "sentences": [
                    {"raw": c, "tokens": word_tokens(c), "imgid": i, "sentid": s} for c, s in zip(captions, sentids)
                ],
            }
        )
    (tmp / "dataset.json").write_text(json.dumps({"dataset": "shapes", "images": entries}) + "\n")

    if keep_existing and (out_dir / "dataset.json").is_file():
        shutil.rmtree(tmp)  # a concurrent ensure_shapes finished first: keep its (identical) files
    else:
        old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():  # an earlier (maybe incomplete) version: moved aside, then deleted
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    return out_dir / "dataset.json"


def ensure_shapes(cfg: ShapesDataset, progress: bool = True) -> Path:
    """The dataset JSON for ``cfg``, generated into the cache only if not there yet."""
    out_dir = shapes_dir(cfg.cache_dir, cfg.images, cfg.seed, cfg.image_size)
    json_path = out_dir / "dataset.json"
    if json_path.is_file():  # dataset.json only appears once the folder is complete (atomic rename)
        return json_path
    # Two processes may race here; each generates privately and the loser keeps the winner's files.
    return _generate(out_dir, cfg.images, cfg.seed, cfg.image_size, progress, keep_existing=True)
