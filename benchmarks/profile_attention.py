"""Where one ``attention`` training step spends its time, beside ``init`` at the same width and precision.

    PYTHONPATH=. python benchmarks/profile_attention.py [--cell gru] [--hidden 512] [--threads 1] [--steps 10]
                                                        [--precision fp32 bf16] [--rows 14]

The Flickr8k study's shapes: batch 64, 13 tokens (12 input steps), vocabulary 2500, embed 256, attention_dim 128,
EfficientNet-Lite0 features (1280 channels, 7 x 7 grid), AdamW (fused), gradient clipping, the project's own
``build_captioner`` and ``masked_nll``. Prints ms per step (median of ``--steps`` after 3 warm-up steps) for
``init`` and ``attention`` and their ratio, then ``torch.profiler``'s table of attention's step by self CPU time.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from study.config import TrialConfig
from study.evaluation import masked_nll
from study.models import build_captioner
from study.precision import autocast

BATCH, TOKENS, VOCAB, EMBED, FEAT, GRID, ATTENTION = 64, 13, 2500, 256, 1280, 49, 128


def training_step(inject: str, cell: str, hidden: int, precision: str):
    """A closure running one training step of a fresh model on fixed random inputs."""
    torch.manual_seed(0)
    cfg = TrialConfig(inject=inject, cell=cell, hidden=hidden, embed=EMBED, attention_dim=ATTENTION, dropout=0.3)
    model = build_captioner(cfg, VOCAB, FEAT).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    pooled = torch.randn(BATCH, FEAT)
    grid = torch.randn(BATCH, GRID, FEAT) if model.needs_grid else None
    tokens = torch.randint(4, VOCAB, (BATCH, TOKENS))
    device = torch.device("cpu")

    def step() -> None:
        with autocast(device, precision):
            logits = model(pooled, grid, tokens[:, :-1])  # (B, T-1, V)
        loss_sum, n = masked_nll(logits, tokens[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()

    return step


def ms_per_step(step, steps: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", default="gru")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--rows", type=int, default=14, help="rows of the profiler table (0: none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.cell} 1 x {args.hidden}, batch {BATCH}, {TOKENS} tokens, vocab {VOCAB}, {args.threads} thread(s)")
    print("| precision | init ms/step | attention ms/step | attention / init |")
    print("|---|---:|---:|---:|")
    for precision in args.precision:
        init = ms_per_step(training_step("init", args.cell, args.hidden, precision), args.steps)
        attention = ms_per_step(training_step("attention", args.cell, args.hidden, precision), args.steps)
        print(f"| {precision} | {init:.1f} | {attention:.1f} | {attention / init:.2f}x |", flush=True)
    if args.rows:
        for precision in args.precision:
            step = training_step("attention", args.cell, args.hidden, precision)
            for _ in range(3):
                step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    step()
            print(f"\nattention, {precision}: 5 steps, by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                            max_name_column_width=38))


if __name__ == "__main__":
    main()
