"""Caption image files with a trained checkpoint (``study caption``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from study.config import TrialConfig
from study.data.features import get_encoder, preprocess
from study.data.karpathy import load_image
from study.data.tokens import Vocab
from study.models import build_captioner
from study.training import load_checkpoint, pick_device


def load_captioner(checkpoint: Path, device: torch.device) -> tuple[torch.nn.Module, TrialConfig, Vocab]:
    state = load_checkpoint(checkpoint)
    cfg = TrialConfig.model_validate(state["config"])
    vocab = Vocab.from_dict(state["vocab"])
    model = build_captioner(cfg, len(vocab), int(state["feature_dim"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, vocab


@torch.inference_mode()
def caption_files(checkpoint: Path, images: Sequence[Path], *, beam_size: int = 3, device: str | None = None,
                  batch_size: int = 16) -> Iterator[tuple[Path, str]]:
    """Yield (image path, caption) for each image, encoding it with the checkpoint's encoder."""
    dev = pick_device(device)
    model, cfg, vocab = load_captioner(checkpoint, dev)
    spec = get_encoder(cfg.dataset.encoder)
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
