"""Caption image files with a trained checkpoint (``study caption``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from study.config import TrialConfig, checkpoint_config
from study.data.features import EncoderSpec, get_encoder, preprocess
from study.data.karpathy import load_image
from study.data.tokens import Vocab
from study.models import build_captioner
from study.training import CheckpointError, load_checkpoint, pick_device


def load_captioner(checkpoint: Path, device: torch.device) -> tuple[torch.nn.Module, TrialConfig, Vocab]:
    """The trained model, its config and vocabulary: from the checkpoint alone, never its training dataset."""
    return _captioner(load_checkpoint(checkpoint), checkpoint, device)


def _captioner(state: dict[str, Any], source: Path, device: torch.device
               ) -> tuple[torch.nn.Module, TrialConfig, Vocab]:
    cfg = checkpoint_config(state["config"], f"{source}: config")
    vocab = Vocab.from_dict(state["vocab"])
    model = build_captioner(cfg, len(vocab), int(state["feature_dim"]))
    model.load_state_dict(state["model"])
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


@torch.inference_mode()
def caption_files(checkpoint: Path, images: Sequence[Path], *, beam_size: int = 3, device: str | None = None,
                  batch_size: int = 16) -> Iterator[tuple[Path, str]]:
    """Yield (image path, caption) for each image, encoding it with the checkpoint's encoder."""
    dev = pick_device(device)
    state = load_checkpoint(checkpoint)
    model, cfg, vocab = _captioner(state, checkpoint, dev)
    spec = checkpoint_encoder(state, cfg, checkpoint)
    encoder = spec.build().to(dev).eval()
    for start in range(0, len(images), batch_size):
        paths = [Path(p) for p in images[start:start + batch_size]]
        pixels = torch.from_numpy(np.stack([preprocess(load_image(p), spec) for p in paths])).to(dev)
        grid = encoder(pixels)  # (B, C, g, g)
        grid = grid.flatten(2).transpose(1, 2).float()  # (B, g*g, C)
        pooled = grid.mean(dim=1)  # (B, C)
        if beam_size == 1:
            ids = model.greedy(pooled, grid if model.needs_grid else None, cfg.effective_max_len)
        else:
            ids = model.beam_search(pooled, grid if model.needs_grid else None, beam_size,
                                    cfg.effective_max_len, cfg.length_penalty)
        for path, row in zip(paths, ids.cpu()):
            yield path, vocab.decode(row)
