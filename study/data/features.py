"""Image features, computed once per (dataset, encoder) by a frozen CNN and cached on disk.

A cache folder ``cache_dir/features/<encoder>/<key>/`` holds

- ``pooled.npy`` (N, C) float16: the mean of the grid over its positions, one row per image;
- ``grid.npy``   (N, g*g, C) float16: the CNN's last feature map, positions in row-major order;
- ``meta.json``: encoder, spec version, preprocessing, N, keys (row order), failed keys, ``complete: true``.

``<key>`` hashes the caller's dataset fingerprint with everything that changes the numbers (encoder name,
spec version, preprocessing), so a changed dataset or preprocessing never reuses stale features.

Writing is crash-safe: rows go into ``<key>.partial/`` through ``np.lib.format.open_memmap``; after every
batch the arrays are flushed and then ``progress.json`` records how many rows are done. A rerun resumes
from there. Only after the last batch and ``meta.json`` is the folder renamed to ``<key>/``, so a folder
without ``.partial`` is always complete. A finished cache opens as memmaps: loading costs no CNN work and
almost no I/O until rows are touched.

The encoders themselves (registry, preprocessing, the CNN forward pass) are ``study.data.encoders``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from study.data.encoders import EncoderSpec, encode_images, get_encoder, load_encoder, pick_device, preprocess
from study.data.karpathy import load_image as _load_image  # 8-bit RGB; DatasetError (a ValueError) if bad
from study.progress import progress_bar
from study.records.files import atomic_write_json

# Errors a broken or missing image raises while being decoded and preprocessed (karpathy.load_image raises
# DatasetError, a ValueError; the rest is belt and braces for PIL).
IMAGE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class ImageReadError(RuntimeError):
    """An image could not be read or decoded; the message names the key and the file."""


# ---------------------------------------------------------------------------------------------------------
# Decoding (in worker threads, ahead of the CNN)
# ---------------------------------------------------------------------------------------------------------


def _decode(key: str, path: Path, spec: EncoderSpec) -> tuple[np.ndarray | None, str | None]:
    """Runs in a worker thread (PIL releases the GIL while decoding and resizing): (array, None) or
    (None, error message)."""
    try:
        return preprocess(_load_image(path), spec), None
    except IMAGE_ERRORS as exc:
        return None, f"cannot read image {key!r} ({path}): {type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------------


@dataclass
class FeatureCache:
    """A finished feature cache, opened as read-only memmaps."""

    path: Path
    pooled: np.ndarray = field(repr=False)  # (N, C) float16 memmap
    grid: np.ndarray = field(repr=False)  # (N, g*g, C) float16 memmap, spatial positions row-major
    keys: list[str] = field(repr=False)  # image key of each row, in the order given
    failed: list[str]  # keys whose image could not be read (on_error='skip'); their rows are zero
    reused: bool  # True when nothing had to be computed in this call
    nbytes: int  # bytes of pooled + grid
    encoder: str
    computed: int = 0  # rows the CNN encoded in this call (0 when reused; fewer than N after a resume)


def feature_cache_key(image_fingerprint: str, spec: EncoderSpec) -> str:
    """16 hex digits of a sha256 over the dataset fingerprint and everything that changes the features."""
    payload = {"fingerprint": image_fingerprint, "encoder": spec.name, "version": spec.version,
               "feature_dim": spec.feature_dim, "grid_size": spec.grid_size, **spec.preprocessing()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _keys_digest(keys: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def _write_json(path: Path, data: dict) -> None:
    atomic_write_json(path, data, indent=1)  # a reader (a resuming extractor) never sees half a file


def _open_finished(folder: Path, keys: list[str], on_error: str, reused: bool, computed: int) -> FeatureCache:
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    if not meta.get("complete"):
        raise RuntimeError(f"{meta_path}: feature cache is not marked complete; delete {folder}")
    if meta["keys"] != keys:
        raise ValueError(f"{meta_path}: the cached images (or their order) differ from the ones asked for, "
                         f"under the same fingerprint; the fingerprint must cover the image list "
                         f"(or delete {folder})")
    if meta["failed"] and on_error == "error":
        raise ImageReadError(f"{meta_path}: this cache was built with on_error='skip' and these images "
                             f"could not be read: {', '.join(meta['failed'][:10])}"
                             f"{' ...' if len(meta['failed']) > 10 else ''}")
    pooled = np.load(folder / "pooled.npy", mmap_mode="r")  # (N, C)
    grid = np.load(folder / "grid.npy", mmap_mode="r")  # (N, g*g, C)
    return FeatureCache(path=folder, pooled=pooled, grid=grid, keys=keys, failed=list(meta["failed"]),
                        reused=reused, nbytes=int(pooled.nbytes + grid.nbytes), encoder=meta["encoder"],
                        computed=computed)


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """One extractor per cache key at a time (e.g. several Ray workers on one node); the others wait and
    then find the finished cache."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _batches_prefetched(items: Sequence[tuple[str, Path]], start: int, batch_size: int, spec: EncoderSpec,
                        pool: ThreadPoolExecutor | None, ahead: int = 2):
    """Yield (row0, [(array|None, error|None), ...]) per batch, decoding up to ``ahead`` batches in advance
    in ``pool`` so the CNN never waits; bounded so memory stays at a few batches even for COCO."""
    starts = range(start, len(items), batch_size)
    queue: deque[tuple[int, list[Future] | list[tuple]]] = deque()

    def submit(row0: int) -> None:
        chunk = items[row0:row0 + batch_size]
        if pool is None:
            queue.append((row0, [_decode(key, Path(path), spec) for key, path in chunk]))
        else:
            queue.append((row0, [pool.submit(_decode, key, Path(path), spec) for key, path in chunk]))

    pending = iter(starts)
    for row0 in pending:
        submit(row0)
        if len(queue) > ahead:
            break
    while queue:
        row0, jobs = queue.popleft()
        next_row0 = next(pending, None)
        if next_row0 is not None:
            submit(next_row0)
        yield row0, [job.result() if isinstance(job, Future) else job for job in jobs]


def extract_features(
    items: Sequence[tuple[str, Path]],
    *,
    encoder: str = "efficientnet_lite0",
    cache_dir: Path,
    fingerprint: str,
    batch_size: int = 32,
    device: str | None = None,
    on_error: str = "error",
    progress: bool = True,
    num_workers: int = 2,
) -> FeatureCache:
    """Features of ``items`` ((key, absolute image path) in row order), computed once and cached.

    A finished cache for the same fingerprint and encoder spec is opened without building the CNN; an
    interrupted one resumes from its last flushed batch. ``on_error``: 'error' raises ``ImageReadError``
    naming the file; 'skip' leaves a zero row and lists the key in ``failed``. ``num_workers`` decoding
    threads (0: decode in this thread).
    """
    if on_error not in ("error", "skip"):
        raise ValueError(f"on_error must be 'error' or 'skip', got {on_error!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    spec = get_encoder(encoder)
    keys = [key for key, _ in items]
    if not keys:
        raise ValueError("extract_features: no images given")
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise ValueError(f"extract_features: duplicate image keys, e.g. {dupes}")

    key = feature_cache_key(fingerprint, spec)
    root = Path(cache_dir) / "features" / spec.name
    final, partial = root / key, root / f"{key}.partial"
    if (final / "meta.json").is_file():  # fast path, no lock: a final folder is always complete
        return _open_finished(final, keys, on_error, reused=True, computed=0)

    with _locked(root / f"{key}.lock"):
        if (final / "meta.json").is_file():  # another process finished it while we waited
            return _open_finished(final, keys, on_error, reused=True, computed=0)
        computed = _fill_partial(partial, items, keys, spec, key, fingerprint, batch_size=batch_size,
                                 device=pick_device(device), on_error=on_error, progress=progress,
                                 num_workers=num_workers)
        os.rename(partial, final)  # atomic: the cache appears complete or not at all
    return _open_finished(final, keys, on_error, reused=False, computed=computed)


def _open_partial(partial: Path, identity: dict, pooled_shape: tuple[int, int],
                  grid_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, dict]:
    """(pooled, grid, progress) of a partial folder: its memmaps and progress when its progress.json matches
    ``identity`` (same cache key and images), else a fresh folder with zeroed arrays and no rows done."""
    progress_path = partial / "progress.json"
    state = None
    if progress_path.is_file():
        try:
            state = json.loads(progress_path.read_text())
        except json.JSONDecodeError:
            state = None
        if state is None or any(state.get(k) != v for k, v in identity.items()):
            state = None
    if state is not None:
        return (np.lib.format.open_memmap(partial / "pooled.npy", mode="r+"),
                np.lib.format.open_memmap(partial / "grid.npy", mode="r+"), state)
    # Fresh start (or a partial folder from different inputs: start over).
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    pooled = np.lib.format.open_memmap(partial / "pooled.npy", mode="w+", dtype=np.float16, shape=pooled_shape)
    grid = np.lib.format.open_memmap(partial / "grid.npy", mode="w+", dtype=np.float16, shape=grid_shape)
    state = {**identity, "rows_done": 0, "failed": []}
    _write_json(progress_path, state)
    return pooled, grid, state


def _encode_batch(model, decoded: list, batch_keys: list[str], spec: EncoderSpec, device: torch.device,
                  on_error: str, failed: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """One batch of decoded images through the encoder: pooled (b, C) and grid (b, P, C) float16 features, and how
    many rows were encoded. An image that failed to decode raises (``on_error="error"``), or its key goes to
    ``failed`` and its rows stay zero."""
    ok = []
    for i, (_, error) in enumerate(decoded):
        if error is None:
            ok.append(i)
        elif on_error == "error":
            raise ImageReadError(error)
        else:
            failed.append(batch_keys[i])
    batch_grid = np.zeros((len(decoded), spec.grid_size ** 2, spec.feature_dim), np.float16)
    batch_pooled = np.zeros((len(decoded), spec.feature_dim), np.float16)
    if ok:
        pixels = np.stack([decoded[i][0] for i in ok])  # (b, 3, S, S)
        batch_grid[ok], batch_pooled[ok] = encode_images(model, pixels, spec, device)
    return batch_pooled, batch_grid, len(ok)


def _fill_partial(partial: Path, items: Sequence[tuple[str, Path]], keys: list[str], spec: EncoderSpec,
                  key: str, fingerprint: str, *, batch_size: int, device: torch.device, on_error: str,
                  progress: bool, num_workers: int) -> int:
    """Compute the missing rows of ``partial`` (resuming if its progress matches), then write meta.json.
    Returns the number of rows encoded in this call."""
    n, n_pos, c = len(items), spec.grid_size ** 2, spec.feature_dim
    progress_path = partial / "progress.json"
    identity = {"cache_key": key, "n": n, "keys_sha256": _keys_digest(keys)}
    pooled, grid, state = _open_partial(partial, identity, (n, c), (n, n_pos, c))
    start, failed = int(state["rows_done"]), list(state["failed"])
    computed = 0
    if start < n:
        model = load_encoder(spec, device)
        pool = ThreadPoolExecutor(num_workers, thread_name_prefix="decode") if num_workers > 0 else None
        # Not at a terminal: a line every 30 s (and the last), not a bar redrawn with \r into a log file.
        bar = progress_bar(n, f"features {spec.name}", unit="img", initial=start, enabled=progress,
                           min_interval_s=30, dynamic_ncols=True)
        try:
            for row0, decoded in _batches_prefetched(items, start, batch_size, spec, pool):
                rows = len(decoded)
                batch_pooled, batch_grid, encoded = _encode_batch(model, decoded, keys[row0:row0 + rows], spec,
                                                                  device, on_error, failed)
                computed += encoded
                grid[row0:row0 + rows] = batch_grid
                pooled[row0:row0 + rows] = batch_pooled
                # Flush the rows first, then record them: progress never claims rows not on disk.
                grid.flush()
                pooled.flush()
                state.update(rows_done=row0 + rows, failed=failed)
                _write_json(progress_path, state)
                bar.update(rows)
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    del pooled, grid  # close the memmaps before the folder is renamed
    _write_json(partial / "meta.json", {
        "encoder": spec.name, "spec_version": spec.version, "cache_key": key, "fingerprint": fingerprint,
        "preprocessing": spec.preprocessing(), "feature_dim": c, "grid_size": spec.grid_size, "n": n,
        "keys": keys, "failed": failed, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "complete": True,
    })
    progress_path.unlink()
    return computed
