"""Where one ``attention`` training step spends its time, beside ``init`` at the same width and precision.

    PYTHONPATH=. python benchmarks/profile_attention.py [--cell gru] [--hidden 512] [--threads 1] [--steps 10]
                                                        [--precision fp32 bf16] [--rows 14] [--full-strength 1.0]

The Flickr8k study's shapes: batch 64, 13 tokens (12 input steps), vocabulary 2500, embed 256, attention_dim 128,
EfficientNet-Lite0 features (1280 channels, 7 x 7 grid), AdamW (fused), gradient clipping, the project's own
``build_captioner`` and ``masked_nll``. Prints ms per step (median of ``--steps`` after 3 warm-up steps) for
``init`` and ``attention`` and their ratio, then ``torch.profiler``'s table of attention's step by self CPU time.
``--full-strength LAMBDA`` adds Xu et al.'s options as ``study.trial.training`` runs them: attention with
``attention_init`` (the learned initial state), with ``attention_penalty`` LAMBDA (the weights kept and the
doubly stochastic penalty added to the loss), and with both, each beside plain attention.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from study.config import TrialConfig
from study.models import build_captioner
from study.trial.training import training_loss

BATCH, TOKENS, VOCAB, EMBED, FEAT, GRID, ATTENTION = 64, 13, 2500, 256, 1280, 49, 128


def training_step(inject: str, cell: str, hidden: int, precision: str, attention_init: bool = False,
                  penalty: float = 0.0):
    """A closure running one training step of a fresh model on fixed random inputs (study.trial.training's loss)."""
    torch.manual_seed(0)
    cfg = TrialConfig(inject=inject, cell=cell, hidden=hidden, embed=EMBED, attention_dim=ATTENTION, dropout=0.3,
                      attention_init=attention_init, attention_penalty=penalty)
    model = build_captioner(cfg, VOCAB, FEAT).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    pooled = torch.randn(BATCH, FEAT)
    grid = torch.randn(BATCH, GRID, FEAT) if model.needs_grid else None
    tokens = torch.randint(4, VOCAB, (BATCH, TOKENS))
    device = torch.device("cpu")

    def step() -> None:
        loss, _, _ = training_loss(model, pooled, grid, tokens, penalty=penalty, device=device, precision=precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
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
    parser.add_argument("--full-strength", type=float, default=None, metavar="LAMBDA",
                        help="also time attention with attention_init, with attention_penalty LAMBDA, and both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.cell} 1 x {args.hidden}, batch {BATCH}, {TOKENS} tokens, vocab {VOCAB}, {args.threads} thread(s)")
    print("| precision | init ms/step | attention ms/step | attention / init |")
    print("|---|---:|---:|---:|")
    for precision in args.precision:
        init = ms_per_step(training_step("init", args.cell, args.hidden, precision), args.steps)
        attention = ms_per_step(training_step("attention", args.cell, args.hidden, precision), args.steps)
        print(f"| {precision} | {init:.1f} | {attention:.1f} | {attention / init:.2f}x |", flush=True)
    if args.full_strength is not None:
        full_strength(args)
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


def full_strength(args) -> None:
    """Attention's ms per step with Xu et al.'s options, beside plain attention. The variants take turns, one step
    each per round (median over ``--steps`` rounds), so a machine whose load drifts slows them alike."""
    lam = args.full_strength
    variants = {"plain": (False, 0.0), "attention_init": (True, 0.0), f"penalty {lam:g}": (False, lam),
                f"init + penalty {lam:g}": (True, lam)}
    print(f"\n| precision | {' | '.join(f'{name} ms/step' for name in variants)} | init + penalty / plain |")
    print(f"|---|{'---:|' * (len(variants) + 1)}")
    for precision in args.precision:
        steps = [training_step("attention", args.cell, args.hidden, precision, init, penalty)
                 for init, penalty in variants.values()]
        times: list[list[float]] = [[] for _ in steps]
        for round_ in range(3 + args.steps):  # 3 warm-up rounds
            for step, kept in zip(steps, times):
                t0 = time.perf_counter()
                step()
                if round_ >= 3:
                    kept.append(time.perf_counter() - t0)
        ms = [1000 * sorted(kept)[len(kept) // 2] for kept in times]
        fastest = [1000 * min(kept) for kept in times]  # on a loaded machine the least disturbed step of each
        print(f"| {precision} median | {' | '.join(f'{m:.1f}' for m in ms)} | {ms[-1] / ms[0]:.3f}x |")
        print(f"| {precision} fastest | {' | '.join(f'{m:.1f}' for m in fastest)} | "
              f"{fastest[-1] / fastest[0]:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
