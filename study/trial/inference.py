"""Caption image files with a trained checkpoint (``study caption``).

An image goes the way a training image went: ``study.data.encoders.preprocess`` and ``encode_images`` (the
feature cache's own code, float16 rounding included), then the evaluation's ``decode``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from study.config import TrialConfig, checkpoint_config
from study.data.encoders import EncoderSpec, encode_images, get_encoder, load_encoder, pick_device, preprocess
from study.data.karpathy import load_image
from study.data.tokens import Vocab
from study.models import build_captioner
from study.trial.checkpoints import CheckpointError, load_checkpoint
from study.trial.evaluation import Decoding, decode


def load_captioner(checkpoint: Path, device: torch.device) -> tuple[torch.nn.Module, TrialConfig, Vocab]:
    """The trained model, its config and vocabulary: from the checkpoint alone, never its training dataset."""
    return _captioner(load_checkpoint(checkpoint), checkpoint, device)


def _captioner(state: dict[str, Any], source: Path, device: torch.device
               ) -> tuple[torch.nn.Module, TrialConfig, Vocab]:
    cfg = checkpoint_config(state["config"], f"{source}: config")
    vocab = Vocab.from_dict(state["vocab"])
    model = build_captioner(cfg, len(vocab), int(state["feature_dim"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:  # a config (or vocabulary) edited after training: torch's "size mismatch" traceback
        problems = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise CheckpointError(f"{source}: its weights do not fit the model its own config and vocabulary describe "
                              f"({'; '.join(problems[:3]) or exc}); was the checkpoint edited?") from None
    return model.to(device).eval(), cfg, vocab


def checkpoint_encoder(state: dict[str, Any], cfg: TrialConfig, source: Path) -> EncoderSpec:
    """The image encoder a checkpoint was trained on, refused when this installation's encoder of that name
    would compute other features (another version or preprocessing): the captions would be silently worse."""
    saved = state.get("encoder")
    if saved is None:  # written before checkpoints recorded their encoder: trust the config's name
        saved = {"name": cfg.dataset.encoder}
    try:
        spec = get_encoder(saved["name"])
    except KeyError as exc:
        raise CheckpointError(f"{source} was trained on features of an encoder this installation lacks: "
                              f"{exc.args[0]}") from None
    if "version" in saved and (spec.version, spec.preprocessing()) != (saved["version"], saved["preprocessing"]):
        raise CheckpointError(
            f"{source} was trained on {spec.name} version {saved['version']} with preprocessing "
            f"{saved['preprocessing']}; this installation has version {spec.version} with {spec.preprocessing()}")
    return spec


def image_features(paths: Sequence[Path], encoder: torch.nn.Module, spec: EncoderSpec,
                   device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(grid (b, g*g, C), pooled (b, C)) float16 features of image files: the numbers the feature cache
    holds for them. A file that cannot be read is a ``DatasetError`` (a ValueError) naming it."""
    pixels = np.stack([preprocess(load_image(Path(p)), spec) for p in paths])  # (b, 3, S, S)
    return encode_images(encoder, pixels, spec, device)


@torch.inference_mode()
def caption_files(checkpoint: Path, images: Sequence[Path], *, beam_size: int = 3, device: str | None = None,
                  batch_size: int = 16) -> Iterator[tuple[Path, str]]:
    """Yield (image path, caption) for each image, encoding it with the checkpoint's encoder."""
    dev = pick_device(device)
    state = load_checkpoint(checkpoint)
    model, cfg, vocab = _captioner(state, checkpoint, dev)
    spec = checkpoint_encoder(state, cfg, checkpoint)
    encoder = load_encoder(spec, dev)
    for start in range(0, len(images), batch_size):
        paths = [Path(p) for p in images[start:start + batch_size]]
        grid, pooled = image_features(paths, encoder, spec, dev)
        # float32 on the device, as training's FeatureSource hands the cached rows to the model
        pooled_t = torch.from_numpy(pooled).to(dev, torch.float32)  # (b, C)
        grid_t = torch.from_numpy(grid).to(dev, torch.float32) if model.needs_grid else None  # (b, g*g, C)
        ids = decode(model, pooled_t, grid_t, Decoding.of(cfg, beam_size=beam_size))
        for path, row in zip(paths, ids.cpu()):
            yield path, vocab.decode(row)
