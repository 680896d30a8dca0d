"""The checkpoint: its format, how it is written, read and checked before a resume.

``checkpoint.pt`` is a ``torch.save`` dict of tensors and plain data (loadable with ``weights_only=True``): the
model, optimiser and schedule states, the epoch, the trial's config, vocabulary, feature size and image encoder
(with its preprocessing), the per-epoch history, the data's description and torch's RNG state. It is
self-contained for captioning: ``study caption`` needs neither the dataset nor its feature cache. Every write is
write-then-rename, so a kill never leaves half a checkpoint where a whole one is expected.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from study.config import TrialConfig
from study.data.encoders import get_encoder
from study.data.tokens import Vocab

CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(ValueError):
    """A file is not a usable caption-study checkpoint; the message names the file and what is wrong."""


# What captioning needs from a checkpoint, and what resuming training needs on top.
CAPTION_KEYS = ("model", "config", "vocab", "feature_dim")
RESUME_KEYS = ("optimizer", "scheduler", "epoch", "history", "torch_rng")
# TrialConfig fields that shape the model's tensors: the ones named when a resumed model does not fit its checkpoint.
MODEL_SHAPE_FIELDS = ("inject", "cell", "layers", "hidden", "embed", "attention_dim", "attention_init", "seed_h",
                      "tokens", "min_count")


def _write_then_rename(final: Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` a temporary file beside ``final`` (same filesystem), then rename it over ``final``.

    As study.records.files does, but the writer streams into the file: study.records.files takes bytes, and the
    weights plus
    Adam's two moments of the largest model a spec allows (4 layers x 4096) are GBs, a second in-memory copy of
    which would be made every epoch by each of the trials Ray packs onto a node. The temporary name carries the
    PID: two processes writing the same file never share one."""
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def save_checkpoint(directory: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, cfg: TrialConfig,
                    vocab: Vocab, history: list[dict[str, Any]], data_info: dict[str, Any],
                    feature_dim: int) -> Path:
    """Write ``checkpoint.pt`` atomically (temporary file + rename); loadable with ``torch.load(weights_only=True)``.

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
    _write_then_rename(directory / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))
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
    # A field the checkpoint predates had its default then (every field added since defaults to the old model).
    was = {k: old.get(k, TrialConfig.model_fields[k].default) for k in MODEL_SHAPE_FIELDS}
    changed = [k for k in MODEL_SHAPE_FIELDS if was[k] != getattr(cfg, k)]
    if changed:
        then = ", ".join(f"{k}={was[k]}" for k in changed)
        now = ", ".join(f"{k}={getattr(cfg, k)}" for k in changed)
        why = f"the checkpoint was trained with {then}, this config has {now}"
    else:
        why = "its vocabulary or image features differ from this data's (it was trained on other data)"
    raise CheckpointError(f"cannot resume from {source}: {why}; resume with the checkpoint's settings, "
                          "or train into a new folder")


def copy_checkpoint(work_dir: Path, out_dir: Path, folder: str = "checkpoint") -> Path:
    """Copy the checkpoint in ``work_dir/folder`` (by default the last epoch's) to ``out_dir/checkpoint.pt``,
    atomically: the copy streams into a temporary file beside the target (never the whole file in memory) that is
    then renamed over it, so a kill mid-copy leaves the previous epoch's checkpoint, never a truncated one."""
    src = work_dir / folder / CHECKPOINT_FILE
    dst = out_dir / CHECKPOINT_FILE
    if src.resolve() != dst.resolve():
        _write_then_rename(dst, lambda tmp: shutil.copyfile(src, tmp))
    return dst
