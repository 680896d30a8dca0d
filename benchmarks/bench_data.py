"""Data-foundation timings: shapes generation, Karpathy loading + fingerprint, vocabulary encoding.

Run: ``python benchmarks/bench_data.py [--images 1000] [--image-size 128]``. Prints numbers, asserts nothing.
Flickr8k timings need ../shared/data/flickr8k-1k (skipped when absent).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from study.data.karpathy import load_karpathy
from study.data.shapes import generate_shapes
from study.data.tokens import Vocab

FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared/data/flickr8k-1k/dataset_flickr8k.json"


def _timed(label: str, fn):
    start = time.perf_counter()
    out = fn()
    print(f"{label:<44s} {time.perf_counter() - start:8.3f} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        json_path = _timed(
            f"generate_shapes {args.images} x {args.image_size}px",
            lambda: generate_shapes(Path(tmp) / "s", images=args.images, image_size=args.image_size, progress=False),
        )
        size_mb = sum(p.stat().st_size for p in json_path.parent.rglob("*") if p.is_file()) / 1e6
        print(f"{'  on disk':<44s} {size_mb:8.1f} MB")
        ds = _timed("load_karpathy(shapes)", lambda: load_karpathy(json_path))
        _timed("fingerprint(shapes)", ds.fingerprint)
        captions = [c for r in ds.records for c in r.captions]
        for kind in ("word", "char"):
            vocab = Vocab.build(kind, [c for r in ds.split("train") for c in r.captions])
            _timed(f"encode_batch shapes {kind} ({len(captions)} caps, V={len(vocab)})",
                   lambda: vocab.encode_batch(captions, 20 if kind == "word" else 100))

    if FLICKR8K.is_file():
        ds = _timed("load_karpathy(flickr8k-1k)", lambda: load_karpathy(FLICKR8K))
        captions = [c for r in ds.records for c in r.captions] * 8  # ~ full Flickr8k's 40k captions
        for kind in ("word", "char"):
            vocab = Vocab.build(kind, [c for r in ds.split("train") for c in r.captions])
            _, _, cut = _timed(f"encode_batch flickr {kind} ({len(captions)} caps, V={len(vocab)})",
                               lambda: vocab.encode_batch(captions, 20 if kind == "word" else 100))
            print(f"{'  truncated':<44s} {cut:8d}")
    else:
        print(f"(no {FLICKR8K}: Flickr8k timings skipped)")


if __name__ == "__main__":
    main()
