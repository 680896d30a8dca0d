"""Training-loop overhead: ``study.trial.training._train_epoch`` against a bare hand-written loop.

    PYTHONPATH=. python benchmarks/bench_training.py [--epochs 3] [--threads 1 2] [--inject init]

Both loops train the same captioner (``build_captioner`` with the default ``TrialConfig``: lstm 1x256, word
tokens, batch 64, Adam, clip 5) on the same batches of the default ``shapes`` data: the batch index lists come
from ``length_bucketed_batches`` with the epoch's rng exactly as ``run_trial`` makes them, and the bare loop
gets its (tokens, pooled) tensors gathered up front, so it does no indexing, no casting and no bookkeeping:

    for tokens, pooled in batches:
        loss = cross_entropy(model(pooled, None, tokens[:, :-1]), tokens[:, 1:], ignore_index=PAD)
        zero_grad; backward; clip_grad_norm_; step

Epochs of the two loops alternate (study, bare, study, bare ...) so that load from other processes on a shared
machine hits both alike; each loop's figure is the median epoch. The two models start from the same weights
and the same dropout seed, so their first-epoch losses must agree (to ~1e-3: the study's cosine schedule
already lowers the rate a little within epoch 1, the bare loop keeps it constant): printed, proving the loops
see the same batches. Overhead = study / bare - 1.

``--profile`` also runs cProfile over one study epoch and prints the top entries by own time.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import math
import os
import pstats
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from study.config import TrialConfig
from study.data.prepare import TokenSetting, prepare
from study.data.tokens import PAD
from study.models import build_captioner
from study.trial.evaluation import FeatureSource, SplitTensors
from study.trial.precision import autocast
from study.trial.training import _lr_lambda, _train_epoch, build_optimizer, length_bucketed_batches


def epoch_batches(cfg: TrialConfig, train: SplitTensors, epoch: int) -> list[np.ndarray]:
    """The caption indices of each batch of ``epoch``, drawn as ``run_trial`` draws them."""
    return length_bucketed_batches(train.lengths, cfg.batch_size, np.random.default_rng([cfg.seed, epoch]))


def gather(batches: list[np.ndarray], train: SplitTensors,
           features: FeatureSource) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """(tokens (B, L_batch), pooled (B, F) float32, target count) per batch, made before the clock starts."""
    out = []
    for idx in batches:
        tokens = train.ids[torch.from_numpy(idx), : int(train.lengths[idx].max())].contiguous()
        pooled, _ = features(train.feature_rows[idx])
        out.append((tokens, pooled, int((tokens[:, 1:] != PAD).sum())))
    return out


def bare_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, clip: float,
               batches: list[tuple[torch.Tensor, torch.Tensor, int]]) -> float:
    """The minimal loop; returns the token-weighted mean loss (to check both loops saw the same batches).

    The loss is summed as a detached tensor and read once at the end, so the bookkeeping costs one tiny
    add per batch."""
    model.train()
    total = torch.zeros(())
    count = 0
    for tokens, pooled, n in batches:
        logits = model(pooled, None, tokens[:, :-1])  # (B, T-1, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), ignore_index=PAD)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        total += loss.detach() * n
        count += n
    return float(total) / count


def bookkeeping_seconds(cfg: TrialConfig, train: SplitTensors, features: FeatureSource, epoch: int) -> float:
    """Seconds per epoch of everything ``_train_epoch`` does that the bare loop does not, without the model:
    batch drawing, token/feature gathering and casting, the autocast context, the target count, the LR
    scheduler step, the on-device loss sum and the (disabled) progress bar. A deterministic, load-robust
    estimate of the overhead, next to the noisy end-to-end difference."""
    dummy = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([dummy], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, len(train.lengths) // cfg.batch_size + 1))
    opt.step()  # (only so that the scheduler does not warn about stepping before the optimiser)
    device = torch.device("cpu")
    t0 = time.perf_counter()
    batches = length_bucketed_batches(train.lengths, cfg.batch_size, np.random.default_rng([cfg.seed, epoch]))
    total = torch.zeros(())
    for idx in tqdm(batches, disable=True):
        tokens = train.ids[torch.from_numpy(idx), : int(train.lengths[idx].max())].to(device, non_blocking=True)
        pooled, _ = features(train.feature_rows[idx])
        with autocast(device, cfg.precision):
            pass
        n = int((tokens[:, 1:] != PAD).sum())
        sched.step()
        total += torch.ones(()) / n
    return time.perf_counter() - t0


def measure(cfg: TrialConfig, data, epochs: int, threads: int, profile: bool) -> dict[str, float]:
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    tokens = data.tokens_for(cfg)
    train = SplitTensors.of(tokens.splits["train"], data.images["train"].rows)
    features = FeatureSource(data, device, need_grid=cfg.inject == "attention")
    torch.manual_seed(cfg.seed)
    base = build_captioner(cfg, len(tokens.vocab), data.feature_dim)

    # Two identical models, optimisers and schedulers: one per loop, so neither trains the other's weights.
    study_model, bare_model = copy.deepcopy(base), copy.deepcopy(base)
    study_opt, bare_opt = build_optimizer(cfg, study_model), build_optimizer(cfg, bare_model)
    steps = math.ceil(len(train.lengths) / cfg.batch_size)
    study_sched = torch.optim.lr_scheduler.LambdaLR(study_opt, _lr_lambda(cfg, steps))

    study_times, bare_times, losses = [], [], []
    for epoch in range(1, epochs + 1):
        gathered = gather(epoch_batches(cfg, train, epoch), train, features)

        torch.manual_seed(1000 + epoch)  # same dropout masks in both loops
        t0 = time.perf_counter()
        study_loss, _, _ = _train_epoch(study_model, study_opt, study_sched, cfg, train, features, device,
                                        np.random.default_rng([cfg.seed, epoch]), epoch, progress=False)
        study_times.append(time.perf_counter() - t0)

        torch.manual_seed(1000 + epoch)
        t0 = time.perf_counter()
        bare_loss = bare_epoch(bare_model, bare_opt, cfg.clip, gathered)
        bare_times.append(time.perf_counter() - t0)
        losses.append((study_loss, bare_loss))

    if profile:
        epoch = epochs + 1
        prof = cProfile.Profile()
        prof.enable()
        _train_epoch(study_model, study_opt, study_sched, cfg, train, features, device,
                     np.random.default_rng([cfg.seed, epoch]), epoch, progress=False)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
        print(buf.getvalue())

    study_s, bare_s = statistics.median(study_times), statistics.median(bare_times)
    extra = min(bookkeeping_seconds(cfg, train, features, epoch) for epoch in range(1, 6))
    return {"extra_s": extra, "study_min": min(study_times), "bare_min": min(bare_times), "threads": threads,
            "batches": steps, "study_s": study_s, "bare_s": bare_s,
            "overhead": study_s / bare_s - 1, "loss_study_1": losses[0][0], "loss_bare_1": losses[0][1],
            "study_all": study_times, "bare_all": bare_times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per loop (the median is reported)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--inject", default="init")
    parser.add_argument("--profile", action="store_true", help="cProfile one extra study epoch")
    args = parser.parse_args()

    cfg = TrialConfig(inject=args.inject)
    t0 = time.perf_counter()
    data = prepare(cfg.dataset, [TokenSetting.of(cfg)], need_grid=cfg.inject == "attention", progress=False)
    print(f"data: {data.name}, {len(data.tokens_for(cfg).splits['train'].lengths)} train captions, "
          f"vocab {len(data.tokens_for(cfg).vocab)}, prepared in {time.perf_counter() - t0:.1f} s; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"model: {cfg.run_name}, batch {cfg.batch_size}, {args.epochs} epochs per loop, torch {torch.__version__}")
    print()
    print("| threads | batches/epoch | study epoch (s) median / min | bare epoch (s) median / min "
          "| overhead median / min | study-only work (s/epoch) | epoch-1 loss study / bare |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for threads in args.threads:
        r = measure(cfg, data, args.epochs, threads, args.profile)
        print(f"| {threads} | {r['batches']} | {r['study_s']:.3f} / {r['study_min']:.3f} "
              f"| {r['bare_s']:.3f} / {r['bare_min']:.3f} | {100 * r['overhead']:+.1f}% / "
              f"{100 * (r['study_min'] / r['bare_min'] - 1):+.1f}% "
              f"| {r['extra_s']:.4f} ({100 * r['extra_s'] / r['bare_min']:.1f}% of bare) "
              f"| {r['loss_study_1']:.4f} / {r['loss_bare_1']:.4f} |", flush=True)
        print(f"<!-- all epochs: study {[round(t, 3) for t in r['study_all']]}, "
              f"bare {[round(t, 3) for t in r['bare_all']]}; load {os.getloadavg()[0]:.2f} -->", flush=True)


if __name__ == "__main__":
    main()
