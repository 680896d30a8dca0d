"""Reader for the Karpathy-split JSON format (Flickr8k, Flickr30k, MS-COCO and our generated ``shapes``).

The format: ``{"dataset": name, "images": [{"filename", "filepath"?, "split", "sentences": [{"raw",
"tokens", ...}], ...}]}``. COCO adds ``filepath`` (``train2014``/``val2014``) and a ``restval`` split.

Loading only checks that each image file exists (a stat per image, cheap even for COCO's 123k); decoding
happens once, during feature extraction, through :func:`load_image`. Every problem is a ``DatasetError``
naming the JSON file, the entry index and the filename, so a broken line in a 100 MB file can be found.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test", "restval")  # values allowed in the JSON
RESTVAL_MODES = ("train", "keep", "drop")  # fold into train, keep as its own split, drop
ON_ERROR_MODES = ("error", "skip")


class DatasetError(ValueError):
    """A dataset file or one of its entries is broken; the message names the file and the entry."""


class _EntryProblem(Exception):
    """A per-entry problem that ``on_error='skip'`` may skip (missing image, no captions, unknown split)."""


@dataclass(frozen=True)
class ImageRecord:
    filename: str  # as in the JSON
    path: Path  # absolute: images_root / filepath? / filename
    split: str  # 'train' | 'val' | 'test' | 'restval' (only when restval='keep')
    captions: tuple[str, ...]  # raw sentences


@dataclass(frozen=True)
class CaptionDataset:
    name: str
    json_path: Path
    images_root: Path
    records: tuple[ImageRecord, ...]
    skipped: tuple[tuple[str, str], ...]  # (filename, reason) of entries skipped with on_error='skip'

    def split(self, name: str) -> list[ImageRecord]:
        """The records of one split, in file order."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; valid splits: {list(SPLITS)}")
        return [r for r in self.records if r.split == name]

    def fingerprint(self) -> str:
        """sha256 over the JSON bytes, each record's split, and each image's relative path and content.

        It changes when the captions, the split assignment (e.g. another ``restval`` mode) or any image's
        bytes change, so caches keyed by it are never stale; it stays when the data is copied, re-mounted or
        touched (new mtimes, same bytes), so a copy of the dataset on a new node reuses the feature cache. The
        paths are relative to ``images_root``, so moving the whole folder keeps it too. Hashing reads every
        image once: about 1 s for Flickr8k's 8000 photos.
        """
        h = hashlib.sha256(self.json_path.read_bytes())
        for r in self.records:
            with open(r.path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            rel = os.path.relpath(r.path, self.images_root)
            h.update(f"\0{rel}\0{r.split}\0{digest}".encode())
        return h.hexdigest()


def load_karpathy(
    json_path: Path, images_root: Path | None = None, *, restval: str = "train", on_error: str = "error"
) -> CaptionDataset:
    """Read a Karpathy-split JSON.

    ``images_root`` defaults to ``<json folder>/images``; an entry's image is ``root/filepath/filename``
    (COCO), or ``root/filename`` when that is where it is. ``restval``: 'train' folds COCO's restval into
    train, 'keep' keeps it as split 'restval', 'drop' leaves it out. ``on_error='skip'`` skips entries with a
    missing image, no captions or an unknown split and lists them in ``skipped``; malformed structure (not
    JSON, no ``images`` list, an entry without ``filename``/``split``/``sentences``, a sentence with neither
    ``raw`` nor ``tokens``) always raises, because it means the file is not what we think it is.
    """
    if restval not in RESTVAL_MODES:
        raise ValueError(f"restval must be one of {list(RESTVAL_MODES)}, got {restval!r}")
    if on_error not in ON_ERROR_MODES:
        raise ValueError(f"on_error must be one of {list(ON_ERROR_MODES)}, got {on_error!r}")
    json_path = Path(json_path).expanduser().resolve()
    root = (Path(images_root) if images_root is not None else json_path.parent / "images").expanduser().resolve()

    try:
        data = json.loads(json_path.read_bytes())
    except FileNotFoundError:
        raise DatasetError(f"{json_path}: dataset JSON does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{json_path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{json_path}: the top level must be an object with an 'images' list (Karpathy format)")
    if not root.is_dir():
        raise DatasetError(f"{json_path}: images_root {root} is not a folder")

    records: list[ImageRecord] = []
    skipped: list[tuple[str, str]] = []
    for index, entry in enumerate(data["images"]):
        filename = entry.get("filename") if isinstance(entry, dict) else None
        where = f"{json_path}: images[{index}] ({filename or 'no filename'})"
        try:
            record = _read_entry(entry, root, restval)
        except _EntryProblem as exc:
            if on_error == "skip":
                skipped.append((str(filename), str(exc)))
                continue
            raise DatasetError(f"{where}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{where}: {exc}") from None
        if record is not None:
            records.append(record)
    name = str(data.get("dataset") or json_path.stem)
    return CaptionDataset(name, json_path, root, tuple(records), tuple(skipped))


def _raw_caption(numbered: tuple[int, object]) -> str:
    """sentences[k]'s text: its 'raw', or its 'tokens' joined (some exports keep only tokens)."""
    k, sentence = numbered
    if not isinstance(sentence, dict):
        raise ValueError(f"sentences[{k}] must be an object, got {type(sentence).__name__}")
    if "raw" in sentence:
        raw = sentence["raw"]
    elif "tokens" in sentence:
        raw = " ".join(sentence["tokens"])
    else:
        raise ValueError(f"sentences[{k}] has neither 'raw' nor 'tokens'")
    if not isinstance(raw, str):
        raise ValueError(f"sentences[{k}]['raw'] must be a string, got {type(raw).__name__}")
    return raw


def _read_entry(entry: object, root: Path, restval: str) -> ImageRecord | None:
    """One JSON entry -> a record (None for a dropped restval). Raises ValueError for malformed structure
    and _EntryProblem for problems that ``on_error='skip'`` may skip."""
    if not isinstance(entry, dict):
        raise ValueError(f"entry must be an object, got {type(entry).__name__}")
    for key in ("filename", "split", "sentences"):
        if key not in entry:
            raise ValueError(f"entry lacks the key {key!r}")
    filename, split, sentences = entry["filename"], entry["split"], entry["sentences"]
    if not isinstance(filename, str) or not filename:
        raise ValueError(f"'filename' must be a non-empty string, got {filename!r}")
    if not isinstance(sentences, list):
        raise ValueError(f"'sentences' must be a list, got {type(sentences).__name__}")

    if split not in SPLITS:
        raise _EntryProblem(f"unknown split {split!r}; allowed: {list(SPLITS)}")
    if split == "restval":
        if restval == "drop":
            return None
        split = "train" if restval == "train" else "restval"

    captions = [raw.strip() for raw in map(_raw_caption, enumerate(sentences)) if raw.strip()]
    if not captions:
        raise _EntryProblem("no captions (empty 'sentences' list or only empty sentences)")

    filepath = entry.get("filepath")
    if filepath is not None and not isinstance(filepath, str):
        raise ValueError(f"'filepath' must be a string, got {filepath!r}")
    path = root / filepath / filename if filepath else root / filename
    if not path.is_file() and filepath and (root / filename).is_file():
        path = root / filename  # images_root already points inside the filepath folder
    inside = Path(os.path.normpath(path))  # lexical: '..' and absolute names count, symlinks in the root do not
    if inside != root and root not in inside.parents:
        # A crafted entry would be read, encoded and could end up embedded in report.html.
        raise ValueError(f"the image path {filepath or ''}/{filename} leads outside images_root {root} (to "
                         f"{inside}); entries must name files under images_root")
    if not path.is_file():
        raise _EntryProblem(f"image file {path} does not exist")
    return ImageRecord(filename, path, split, tuple(captions))


# --- decoding ------------------------------------------------------------------------------------------
def load_image(path: Path) -> Image.Image:
    """Decode an image as 8-bit RGB, whatever it was stored as.

    Transparent images (RGBA, LA, palette with transparency) are composited on white, because that is
    how a viewer shows them; 16/32-bit greyscale is scaled down to 8 bits, not clipped. A missing,
    corrupt or truncated file is a ``DatasetError`` naming it.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode now, inside the try: truncation only shows up here
            return _to_rgb(img)
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: cannot decode image: {exc}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if (mode == "P" and "transparency" in img.info) or mode == "PA":
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        # High bit-depth greyscale: PIL's convert('L') would clip everything above 255 to white.
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 0..65535 -> 0..255
        elif mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0  # float images in [0, 1]
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
