"""The one training loop. ``study train`` and the Ray Tune trainable both call :func:`run_trial`.

A trial: seed -> build the captioner from the registries -> for each epoch: teacher-forced training over
length-bucketed batches, validation loss / bits per character / greedy CIDEr-D and BLEU-4 -> checkpoint ->
``report(metrics, checkpoint_dir)``. Optionally a final test evaluation with beam search and the full
metric suite. Exceptions propagate: a trial that fails is failed (Tune records the reason), never papered over.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from study.config import TrialConfig
from study.data.features import get_encoder
from study.data.prepare import PreparedData, SplitCaptions, TokenSet
from study.data.tokens import PAD, Vocab, normalize
from study.metrics import score_captions
from study.models import build_captioner

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
Reporter = Callable[[dict[str, Any], Path], None]


class TrialDiverged(RuntimeError):
    """The training loss became NaN or infinite; the message says when and with which settings."""


class CheckpointError(ValueError):
    """A file is not a usable caption-study checkpoint; the message names the file and what is wrong."""


# What captioning needs from a checkpoint, and what resuming training needs on top.
CAPTION_KEYS = ("model", "config", "vocab", "feature_dim")
RESUME_KEYS = ("optimizer", "scheduler", "epoch", "history", "torch_rng")
# TrialConfig fields that shape the model's tensors: the ones named when a resumed model does not fit its checkpoint.
MODEL_SHAPE_FIELDS = ("inject", "cell", "layers", "hidden", "embed", "attention_dim", "seed_h", "tokens",
                      "min_count")


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` if given, else CUDA when present, else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def length_bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                            bucket_batches: int = 50) -> list[np.ndarray]:
    """Shuffled batches of caption indices whose lengths are similar, so padding is small.

    Shuffle everything, sort each window of ``bucket_batches`` batches by length, cut it into batches and
    shuffle the batch order. Vectorised per window: no Python per caption.
    """
    perm = rng.permutation(len(lengths))
    window = batch_size * bucket_batches
    batches: list[np.ndarray] = []
    for start in range(0, len(perm), window):
        chunk = perm[start:start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


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


def _lr_lambda(cfg: TrialConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = max(1, cfg.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if cfg.schedule == "cosine":
            return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        if cfg.schedule == "step":  # halve the rate at each third of training
            return 0.5 ** (step * 3 // total)
        return 1.0

    return factor


def build_optimizer(cfg: TrialConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # The fused kernel (CPU and CUDA) measured ~10% faster per epoch than the per-tensor default on CPU.
    return cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def _autocast(device: torch.device):
    # bf16 autocast on CUDA needs no GradScaler; on CPU we train in fp32 (CPU autocast is slower for RNNs).
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def masked_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over non-PAD targets and their count. logits (B, T, V), targets (B, T)."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=PAD, reduction="sum")
    return loss, int((targets != PAD).sum())


@torch.no_grad()
def validation_loss(model: torch.nn.Module, split: SplitTensors, features: FeatureSource,
                    device: torch.device, batch_size: int) -> tuple[float, float]:
    """(mean nats per token, total nats) of teacher-forced validation captions."""
    model.eval()
    total, count = 0.0, 0
    order = np.argsort(split.lengths, kind="stable")
    for start in range(0, len(order), batch_size * 2):
        idx = order[start:start + batch_size * 2]
        tokens = split.ids[torch.from_numpy(idx), : int(split.lengths[idx].max())].to(device)
        pooled, grid = features(split.feature_rows[idx])
        with _autocast(device):
            logits = model(pooled, grid, tokens[:, :-1])
        loss, n = masked_nll(logits, tokens[:, 1:])
        total += float(loss)
        count += n
    return total / max(count, 1), total


@torch.no_grad()
def decode_images(model: torch.nn.Module, vocab: Vocab, image_rows: np.ndarray, features: FeatureSource,
                  device: torch.device, *, beam_size: int, max_len: int, length_penalty: float,
                  batch_size: int = 128) -> list[str]:
    """Captions for feature rows: greedy when ``beam_size == 1``, else batched beam search."""
    model.eval()
    captions: list[str] = []
    for start in range(0, len(image_rows), batch_size):
        pooled, grid = features(image_rows[start:start + batch_size])
        with _autocast(device):
            if beam_size == 1:
                ids = model.greedy(pooled, grid, max_len)
            else:
                ids = model.beam_search(pooled, grid, beam_size, max_len, length_penalty)
        captions.extend(vocab.decode(row) for row in ids.cpu())
    return captions


def evaluate(model: torch.nn.Module, cfg: TrialConfig, data: PreparedData, tokens: TokenSet, split: str,
             features: FeatureSource, device: torch.device, *, beam_size: int, full: bool,
             limit: int | None = None, per_image: bool = False,
             timings: dict[str, float] | None = None) -> tuple[dict[str, float], list[str], Any]:
    """Decode a split's images and score them against their references.

    ``timings``, when given, receives ``decode_seconds`` and ``metric_seconds`` (the scoring's share)."""
    images = data.images[split]
    n = len(images.rows) if limit is None else min(limit, len(images.rows))
    t0 = time.perf_counter()
    hyps = decode_images(model, tokens.vocab, images.rows[:n], features, device, beam_size=beam_size,
                         max_len=cfg.effective_max_len, length_penalty=cfg.length_penalty)
    t1 = time.perf_counter()  # decoding ends with the captions on the CPU: no extra sync needed
    refs = {i: images.references[i] for i in range(n)}
    result = score_captions(refs, dict(enumerate(hyps)), full=full, per_image=per_image)
    if timings is not None:
        timings.update(decode_seconds=t1 - t0, metric_seconds=time.perf_counter() - t1)
    if per_image:
        scores, per = result
        return scores, hyps, per
    return result, hyps, None


def caption_char_counts(data: PreparedData, split: str, limit: int | None = None) -> int:
    """Characters (plus one end mark per caption) in a split's normalised captions, for bits per character;
    ``limit``: only the first captions, as ``SplitTensors.of`` takes them."""
    captions = [c for refs in data.images[split].references for c in refs][:limit]
    return sum(len(normalize(c)) + 1 for c in captions)


def save_checkpoint(directory: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, cfg: TrialConfig,
                    vocab: Vocab, history: list[dict[str, Any]], data_info: dict[str, Any],
                    feature_dim: int) -> Path:
    """Write ``checkpoint.pt`` atomically (tmp + rename); loadable with ``torch.load(weights_only=True)``.

    The checkpoint is self-contained for captioning: config, vocabulary, feature size and the encoder with
    its preprocessing travel with the weights, so ``study caption`` needs neither the dataset nor its cache.
    """
    directory.mkdir(parents=True, exist_ok=True)
    encoder = get_encoder(cfg.dataset.encoder)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "config": cfg.model_dump(mode="json", by_alias=True),
        "vocab": vocab.to_dict(),
        "history": history,
        "feature_dim": feature_dim,
        # Captioning a new image must reproduce the features the model was trained on.
        "encoder": {"name": encoder.name, "version": encoder.version, "preprocessing": encoder.preprocessing()},
        "data_info": {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in data_info.items()},
        "torch_rng": torch.get_rng_state(),
    }
    tmp = directory / (CHECKPOINT_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, directory / CHECKPOINT_FILE)
    return directory


def load_checkpoint(path: Path, *, for_resume: bool = False) -> dict[str, Any]:
    """Load a checkpoint file or a directory holding one (weights only: no code runs on load).

    Anything that is not a caption-study checkpoint is a ``CheckpointError`` naming the file; it never
    suggests ``weights_only=False``, which would run whatever code a crafted file holds.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message here advises weights_only=False: the one thing a user must not do with a stranger's file.
        raise CheckpointError(f"{path} is not a caption-study checkpoint: it is corrupt or holds Python objects "
                              "other than tensors and plain data (never loaded: no code from a file runs)") from None
    except (EOFError, RuntimeError, KeyError) as exc:
        # What torch.load raises for an empty file, a zip that is not a torch archive, and plain text.
        raise CheckpointError(f"{path} is not a caption-study checkpoint: not a complete file written by "
                              f"torch.save (empty, truncated or another format; {type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a caption-study checkpoint: it holds a {type(state).__name__}, "
                              "not the dict `study train` writes")
    needed = CAPTION_KEYS + (RESUME_KEYS if for_resume else ())
    missing = [key for key in needed if key not in state]
    if missing:
        use = "resume training" if for_resume else "caption"
        raise CheckpointError(f"{path} is not a caption-study checkpoint that can {use}: it lacks "
                              f"{', '.join(repr(k) for k in missing)}")
    return state


def check_resumable(model: torch.nn.Module, state: dict[str, Any], cfg: TrialConfig, source: Path) -> None:
    """Refuse to resume a model whose tensors do not fit the checkpoint's, naming the settings that differ
    (torch's own error lists tensor names and sizes, not the config keys a user has to change)."""
    own, saved = model.state_dict(), state["model"]
    mismatched = [k for k in own.keys() | saved.keys()
                  if k not in own or k not in saved or own[k].shape != saved[k].shape]
    if not mismatched:
        return
    old = state["config"]
    changed = [k for k in MODEL_SHAPE_FIELDS if old.get(k) != getattr(cfg, k)]
    if changed:
        then = ", ".join(f"{k}={old.get(k)}" for k in changed)
        now = ", ".join(f"{k}={getattr(cfg, k)}" for k in changed)
        why = f"the checkpoint was trained with {then}, this config has {now}"
    else:
        why = "its vocabulary or image features differ from this data's (it was trained on other data)"
    raise CheckpointError(f"cannot resume from {source}: {why}; resume with the checkpoint's settings, "
                          "or train into a new folder")


def _train_epoch(model, optimizer, scheduler, cfg: TrialConfig, train: SplitTensors, features: FeatureSource,
                 device: torch.device, rng: np.random.Generator, epoch: int,
                 progress: bool) -> tuple[float, int, float]:
    """One pass over the training captions. Returns (mean nats per token, tokens seen, data seconds).

    Data seconds: gathering each batch's tokens and features (host time; on a GPU the copies are queued,
    not waited for, so no sync is added to measure them)."""
    model.train()
    batches = length_bucketed_batches(train.lengths, cfg.batch_size, rng)
    total = torch.zeros((), device=device)
    tokens_seen = 0
    data_seconds = 0.0
    bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not progress, unit="batch")
    for step, idx in enumerate(bar):
        t0 = time.perf_counter()
        tokens = train.ids[torch.from_numpy(idx), : int(train.lengths[idx].max())].to(device, non_blocking=True)
        pooled, grid = features(train.feature_rows[idx])
        data_seconds += time.perf_counter() - t0
        with _autocast(device):
            logits = model(pooled, grid, tokens[:, :-1])  # (B, T-1, V)
        loss_sum, n = masked_nll(logits, tokens[:, 1:])
        loss = loss_sum / n
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        scheduler.step()
        total += loss_sum.detach()
        tokens_seen += n
        # A finiteness check syncs a GPU, so only look every 20 steps and at the end.
        if step % 20 == 0 or step == len(batches) - 1:
            mean = float(total) / tokens_seen
            if not math.isfinite(mean):
                raise TrialDiverged(
                    f"training loss became {mean} at epoch {epoch}, step {step} "
                    f"(lr={cfg.lr:g}, clip={cfg.clip:g}, {cfg.run_name})")
            bar.set_postfix(loss=f"{mean:.3f}", refresh=False)
    return float(total) / max(tokens_seen, 1), tokens_seen, data_seconds


def run_trial(
    cfg: TrialConfig,
    data: PreparedData,
    *,
    work_dir: Path,
    report: Reporter | None = None,
    resume_from: Path | None = None,
    device: str | None = None,
    progress: bool = True,
    final_test: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train and evaluate one configuration; the shared loop of ``study train`` and the Tune trainable.

    Each epoch writes ``work_dir/checkpoint/checkpoint.pt`` and calls ``report(metrics, checkpoint_dir)``.
    ``resume_from`` (a checkpoint dir or file) continues after its last finished epoch. With ``final_test``
    the test split is decoded with beam search and scored with the full metric suite.
    Returns ``{"config", "epochs": [per-epoch metrics], "final": {...}}``.
    """
    dev = pick_device(device)
    torch.manual_seed(cfg.seed)
    tokens = data.tokens_for(cfg)
    vocab = tokens.vocab
    model = build_captioner(cfg, len(vocab), data.feature_dim, data.feature_stats).to(dev)
    optimizer = build_optimizer(cfg, model)
    train = SplitTensors.of(tokens.splits["train"], data.images["train"].rows)
    val = SplitTensors.of(tokens.splits["val"], data.images["val"].rows, limit=cfg.val_captions)
    steps_per_epoch = math.ceil(len(train.lengths) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, steps_per_epoch))
    features = FeatureSource(data, dev, need_grid=model.needs_grid)
    val_chars = caption_char_counts(data, "val", limit=cfg.val_captions)
    params = sum(p.numel() for p in model.parameters())

    history: list[dict[str, Any]] = []
    start_epoch = 1
    if resume_from is not None:
        state = load_checkpoint(resume_from, for_resume=True)
        check_resumable(model, state, cfg, Path(resume_from))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        history = list(state["history"])
        start_epoch = int(state["epoch"]) + 1
        log.info("resumed %s after epoch %d", cfg.run_name, start_epoch - 1)

    checkpoint_dir = work_dir / "checkpoint"
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, epoch])
        train_loss, n_tokens, data_seconds = _train_epoch(model, optimizer, scheduler, cfg, train, features, dev,
                                                          rng, epoch, progress)
        train_seconds = time.perf_counter() - t0
        val_loss, val_nats = validation_loss(model, val, features, dev, cfg.batch_size)
        val_loss_seconds = time.perf_counter() - t0 - train_seconds
        timings: dict[str, float] = {}
        scores, _, _ = evaluate(model, cfg, data, tokens, "val", features, dev, beam_size=1, full=False,
                                limit=cfg.val_images, timings=timings)
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_bpc": val_nats / math.log(2) / val_chars,
            "val_CIDEr-D": scores["CIDEr-D"],
            "val_BLEU-4": scores["BLEU-4"],
            "current_lr": optimizer.param_groups[0]["lr"],  # after the schedule; not the config's lr
            "train_seconds": train_seconds,  # includes data_seconds
            "data_seconds": data_seconds,
            "val_loss_seconds": val_loss_seconds,
            "decode_seconds": timings["decode_seconds"],
            "metric_seconds": timings["metric_seconds"],
            "epoch_seconds": time.perf_counter() - t0,
            "tokens_per_second": n_tokens / max(train_seconds, 1e-9),
            "params": params,
        }
        history.append(metrics)
        save_checkpoint(checkpoint_dir, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                        cfg=cfg, vocab=vocab, history=history, data_info=data.info, feature_dim=data.feature_dim)
        if on_epoch is not None:
            on_epoch(metrics)
        if report is not None:
            report(metrics, checkpoint_dir)

    result: dict[str, Any] = {"config": cfg.model_dump(mode="json", by_alias=True), "epochs": history,
                              "params": params, "data": {k: str(v) for k, v in data.info.items()}}
    if final_test:
        scores, hyps, _ = evaluate(model, cfg, data, tokens, "test", features, dev, beam_size=cfg.beam_size,
                                   full=True)
        result["final"] = {"split": "test", "beam_size": cfg.beam_size, **scores}
        images = data.images["test"]
        result["samples"] = [{"image": str(images.paths[i]), "caption": hyps[i],
                              "references": images.references[i]} for i in range(min(10, len(hyps)))]
    return result


def write_metrics(result: dict[str, Any], out_dir: Path) -> Path:
    """Write ``metrics.json`` (per-epoch entries plus final scores) next to the checkpoint."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_json_default, allow_nan=True))
    os.replace(tmp, path)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def copy_checkpoint(work_dir: Path, out_dir: Path) -> Path:
    """Copy the last checkpoint from the work dir to ``out_dir/checkpoint.pt``."""
    src = work_dir / "checkpoint" / CHECKPOINT_FILE
    dst = out_dir / CHECKPOINT_FILE
    if src.resolve() != dst.resolve():
        shutil.copyfile(src, dst)
    return dst
