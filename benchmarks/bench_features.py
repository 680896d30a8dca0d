"""Feature extraction throughput and cached-feature load time on real Flickr8k photos.

    python benchmarks/bench_features.py [--images 64] [--batch-sizes 16 32] [--threads 2] [--device cpu]

Prints: extraction images/s on N photos per batch size (fresh cache each time, decoding in 2 threads), then
for the whole folder (991 photos): one extraction into a temporary cache, and the time to open that cache
and touch every row into a torch tensor (pooled and grid), the way a trial reads it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from study.data.encoders import pick_device
from study.data.features import extract_features

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/flickr8k-1k/images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="photos for the throughput rows")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    parser.add_argument("--data", type=Path, default=DATA, help="folder of JPEGs")
    parser.add_argument("--skip-full", action="store_true", help="skip the whole-folder load benchmark")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    photos = sorted(args.data.glob("*.jpg"))
    if not photos:
        raise SystemExit(f"no JPEGs in {args.data}")
    items = [(p.name, p) for p in photos]
    device = str(pick_device(args.device))
    # The load average says how much of the CPU other processes took: CPU numbers are only comparable
    # between runs at similar load.
    print(f"device={device} torch_threads={args.threads} photos_available={len(items)} "
          f"load_avg_1min={os.getloadavg()[0]:.2f}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # Warm-up: first model build and first convolutions pay one-off costs (weights, allocator).
        extract_features(items[:8], cache_dir=Path(tmp), fingerprint="warmup", batch_size=8,
                         device=device, progress=False)
        for bs in args.batch_sizes:
            start = time.perf_counter()
            cache = extract_features(items[:args.images], cache_dir=Path(tmp), fingerprint=f"bench-bs{bs}",
                                     batch_size=bs, device=device, progress=False)
            seconds = time.perf_counter() - start
            assert cache.computed == min(args.images, len(items))
            rows.append((f"extract {cache.computed} photos, batch {bs}", seconds,
                         f"{cache.computed / seconds:.1f} img/s"))

        if not args.skip_full:
            start = time.perf_counter()
            full = extract_features(items, cache_dir=Path(tmp), fingerprint="bench-full", batch_size=32,
                                    device=device, progress=True)
            seconds = time.perf_counter() - start
            rows.append((f"extract all {len(items)} photos, batch 32", seconds,
                         f"{len(items) / seconds:.1f} img/s; {full.nbytes / 2**20:.0f} MiB on disk"))

            # A reader: open the finished cache (memmaps) and touch every row into torch tensors.
            start = time.perf_counter()
            cache = extract_features(items, cache_dir=Path(tmp), fingerprint="bench-full", progress=False)
            opened = time.perf_counter() - start
            assert cache.reused
            pooled = torch.from_numpy(np.array(cache.pooled))  # (N, 1280) fp16, copied out of the memmap
            grid = torch.from_numpy(np.array(cache.grid))  # (N, 49, 1280) fp16
            checksum = float(pooled.float().sum()) + float(grid.float().sum())
            total = time.perf_counter() - start
            rows.append(("open cached features (memmap)", opened, "no CNN"))
            rows.append((f"open + read all {len(items)} rows to torch", total,
                         f"{(pooled.nbytes + grid.nbytes) / 2**20 / total:.0f} MiB/s (checksum {checksum:.3g})"))

    print(f"load_avg_1min_after={os.getloadavg()[0]:.2f}")
    width = max(len(name) for name, _, _ in rows)
    print(f"\n{'what':<{width}}  {'seconds':>8}  rate")
    for name, seconds, rate in rows:
        print(f"{name:<{width}}  {seconds:8.3f}  {rate}")


if __name__ == "__main__":
    main()
