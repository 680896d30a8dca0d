"""Decoding and scoring a trained captioner: the one evaluation path.

Every caption the project writes goes through :func:`decode` (greedy when ``beam_size == 1``, else beam
search), and every score through :func:`score_split`: the per-epoch validation of ``run_trial`` (greedy, fast
metrics, the first ``val_images`` images), its optional final test, the confirm stage (beam, full suite, per
image) and the benchmarks. ``study caption`` decodes image files with the same :func:`decode`. Teacher-forced
validation loss and bits per character live here too: :func:`validate` is one epoch's whole validation.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Hashable

import numpy as np
import torch
import torch.nn.functional as F

from study.config import TrialConfig
from study.data.prepare import PreparedData, SplitCaptions
from study.data.tokens import PAD, Vocab, normalize
from study.trial.metrics import score_captions, score_captions_per_image
from study.trial.precision import autocast


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class SplitTensors:
    """One split's captions as tensors plus the feature row of each caption, ready for batching."""

    ids: torch.Tensor  # (N_cap, L) int64
    lengths: np.ndarray  # (N_cap,)
    feature_rows: np.ndarray  # (N_cap,) rows of data.pooled / data.grid

    @classmethod
    def of(cls, captions: SplitCaptions, image_rows: np.ndarray, limit: int | None = None) -> "SplitTensors":
        """``limit``: only the first captions (they are in image order)."""
        return cls(torch.from_numpy(captions.ids[:limit]), captions.lengths[:limit],
                   image_rows[captions.image[:limit]])


class FeatureSource:
    """Gathers image features for a batch of feature rows and moves them to the device as float32."""

    def __init__(self, data: PreparedData, device: torch.device, need_grid: bool):
        if need_grid and data.grid is None:
            raise ValueError("this model attends over the spatial grid, but the data was prepared without it")
        with warnings.catch_warnings():
            # Arrays from Ray's object store are read-only; we only ever index (copy) them, never write.
            warnings.simplefilter("ignore", UserWarning)
            self.pooled = torch.from_numpy(data.pooled)  # (N, F) float16, shared memory, no copy
            self.grid = torch.from_numpy(data.grid) if need_grid else None  # (N, G, F) float16
        self.device = device

    def __call__(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        index = torch.from_numpy(rows)
        pooled = self.pooled[index].to(self.device, torch.float32, non_blocking=True)  # (B, F)
        grid = None
        if self.grid is not None:
            grid = self.grid[index].to(self.device, torch.float32, non_blocking=True)  # (B, G, F)
        return pooled, grid


def masked_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over non-PAD targets and their count. logits (B, T, V), targets (B, T)."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=PAD, reduction="sum")
    return loss, int((targets != PAD).sum())


@torch.no_grad()
def validation_loss(model: torch.nn.Module, split: SplitTensors, features: FeatureSource,
                    device: torch.device, batch_size: int, precision: str = "fp32") -> tuple[float, float]:
    """(mean nats per token, total nats) of teacher-forced validation captions, under the training's
    ``precision`` (``study.trial.precision``). The plain NLL for every method: the training's attention penalty
    (``attention_penalty``) is left out, so validation losses compare across methods and penalties."""
    model.eval()
    total, count = 0.0, 0
    order = np.argsort(split.lengths, kind="stable")
    for start in range(0, len(order), batch_size * 2):
        idx = order[start:start + batch_size * 2]
        tokens = split.ids[torch.from_numpy(idx), : int(split.lengths[idx].max())].to(device)  # (B, T)
        pooled, grid = features(split.feature_rows[idx])
        with autocast(device, precision):
            logits = model(pooled, grid, tokens[:, :-1])  # (B, T-1, V)
        loss, n = masked_nll(logits, tokens[:, 1:])
        total += float(loss)
        count += n
    return total / max(count, 1), total


def caption_char_counts(data: PreparedData, split: str, limit: int | None = None) -> int:
    """Characters (plus one end mark per caption) in a split's normalised captions, for bits per character;
    ``limit``: only the first captions, as ``SplitTensors.of`` takes them."""
    captions = [c for refs in data.images[split].references for c in refs][:limit]
    return sum(len(normalize(c)) + 1 for c in captions)


@dataclass(frozen=True)
class Decoding:
    """How captions are generated: a beam of ``beam_size`` (1 is greedy), at most ``max_len`` tokens, the beam's
    ``length_penalty``, under the autocast of ``precision`` (the model's training precision)."""

    beam_size: int = 1
    max_len: int = 20
    length_penalty: float = 0.0
    precision: str = "fp32"

    @classmethod
    def of(cls, cfg: TrialConfig, beam_size: int | None = None) -> "Decoding":
        """A trial's decoding: its beam (or ``beam_size``), length limit, penalty and precision."""
        return cls(cfg.beam_size if beam_size is None else beam_size, cfg.effective_max_len, cfg.length_penalty,
                   cfg.precision)


@torch.no_grad()
def decode(model: torch.nn.Module, pooled: torch.Tensor, grid: torch.Tensor | None, decoding: Decoding
           ) -> torch.Tensor:
    """Token ids (B, T) for features pooled (B, F) and grid (B, G, F) or None: greedy when ``beam_size == 1``
    (a beam of one gives the same captions, slower), else batched beam search."""
    model.eval()
    with autocast(pooled.device, decoding.precision):
        if decoding.beam_size == 1:
            return model.greedy(pooled, grid, decoding.max_len)
        return model.beam_search(pooled, grid, decoding.beam_size, decoding.max_len, decoding.length_penalty)


def decode_images(model: torch.nn.Module, vocab: Vocab, image_rows: np.ndarray, features: FeatureSource,
                  decoding: Decoding, batch_size: int = 128) -> list[str]:
    """Captions for feature rows (``features`` puts them on the model's device)."""
    captions: list[str] = []
    for start in range(0, len(image_rows), batch_size):
        pooled, grid = features(image_rows[start:start + batch_size])
        captions.extend(vocab.decode(row) for row in decode(model, pooled, grid, decoding).cpu())
    return captions


@dataclass
class Evaluation:
    """A model scored on (the first images of) a split."""

    scores: dict[str, float]  # metric -> corpus score on pycocoevalcap's 0..1 scale
    captions: list[str]  # one per image, in the split's order
    per_image: dict[str, dict[Hashable, float]] | None  # metric -> image index -> score (per_image=True only)
    decode_seconds: float
    metric_seconds: float  # scoring's share (tokenising, n-gram statistics; Java in the full suite)


def score_split(model: torch.nn.Module, data: PreparedData, split: str, *, vocab: Vocab, decoding: Decoding,
                full: bool = False, limit: int | None = None, per_image: bool = False) -> Evaluation:
    """Decode a split's images with ``model`` (on its own device; ``vocab`` its vocabulary) and score them against
    their references (raw text, so words outside the vocabulary count as coco-caption counts them).

    ``full`` the coco-caption suite (METEOR, ROUGE-L, SPICE), else BLEU and CIDEr-D only; ``limit`` the first
    images only; ``per_image`` also each image's scores."""
    device = model_device(model)
    features = FeatureSource(data, device, need_grid=model.needs_grid)
    images = data.images[split]
    n = len(images.rows) if limit is None else min(limit, len(images.rows))
    t0 = time.perf_counter()
    hyps = decode_images(model, vocab, images.rows[:n], features, decoding)
    t1 = time.perf_counter()  # decoding ends with the captions on the CPU: no extra sync needed
    refs = {i: images.references[i] for i in range(n)}
    if per_image:
        scores, per = score_captions_per_image(refs, dict(enumerate(hyps)), full=full)
    else:
        scores, per = score_captions(refs, dict(enumerate(hyps)), full=full), None
    return Evaluation(scores, hyps, per, decode_seconds=t1 - t0, metric_seconds=time.perf_counter() - t1)


def validate(model: torch.nn.Module, data: PreparedData, val: SplitTensors, features: FeatureSource,
             val_chars: int, *, vocab: Vocab, decoding: Decoding, batch_size: int, val_images: int | None
             ) -> dict[str, Any]:
    """One epoch's validation: teacher-forced loss and bits per character over the ``val`` captions, greedy
    CIDEr-D and BLEU-4 over the first ``val_images`` val images, and the seconds each part took."""
    t0 = time.perf_counter()
    val_loss, val_nats = validation_loss(model, val, features, features.device, batch_size, decoding.precision)
    val_loss_seconds = time.perf_counter() - t0
    greedy = score_split(model, data, "val", vocab=vocab, decoding=decoding, full=False, limit=val_images)
    return {"val_loss": val_loss, "val_bpc": val_nats / math.log(2) / val_chars,
            "val_CIDEr-D": greedy.scores["CIDEr-D"], "val_BLEU-4": greedy.scores["BLEU-4"],
            "val_loss_seconds": val_loss_seconds, "decode_seconds": greedy.decode_seconds,
            "metric_seconds": greedy.metric_seconds}
