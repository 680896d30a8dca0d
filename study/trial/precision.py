"""Numeric precision of training and decoding: ``precision: auto | fp32 | bf16`` in a trial config.

bf16 means ``torch.autocast(device, bfloat16)`` around the forward pass only: weights, optimiser state,
checkpoints and the loss stay fp32 (``masked_nll`` casts the logits up), and bf16 needs no GradScaler. On a CPU
with AVX512-BF16 or AMX, oneDNN then runs its bf16 LSTM/GRU and matmul kernels (``rnn,brgemm:avx512_core_bf16``
under ``DNNL_VERBOSE``) where fp32 takes the generic reference RNN path: about 2x the trials per CPU-hour here
(README, "Precision"). On a CPU without those units bf16 is emulated and slower, so ``auto`` picks fp32 there.

``auto`` resolves where the work runs (``resolve``). A study resolves it once, in the driver, for the device
its trials use, and pins the result for every trial and confirm run
(``study.records.paths.StudyPaths.pinned_precision``):
a study never mixes precisions between nodes.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]
Resolved = Literal["fp32", "bf16"]


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles).

    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is not the check: it is true on any AVX512 CPU, where
    oneDNN emulates bf16 (slower than fp32). torch's cpuinfo-backed probes name the instructions themselves;
    they are private (``torch.cpu._is_*``), so a torch without them counts as "no"."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve(precision: str, device: torch.device | str) -> Resolved:
    """``auto`` -> bf16 on CUDA and on CPUs with native bf16, else fp32; fp32 and bf16 stay as they are."""
    if precision in ("fp32", "bf16"):
        return precision  # type: ignore[return-value]
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}; valid: auto, fp32, bf16")
    kind = torch.device(device).type
    return "bf16" if kind == "cuda" or (kind == "cpu" and cpu_has_bf16()) else "fp32"


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (a no-op context for fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve(precision, device) == "bf16")
