"""Model speed: training tokens/s per cell and width, achieved FLOP/s against a measured matmul peak, and
batched vs per-image beam search.

    PYTHONPATH=. python benchmarks/bench_models.py [--widths 128 256 512] [--steps 10] [--images 100] [--threads 1]

Training setup (the study's defaults for a word model): 1 layer, batch 64, T = 20, vocab 1000, embed 128,
1280-d image features (EfficientNet-lite0), inject ``init``, Adam. FLOPs are counted analytically for the
matmuls only (input, recurrent and vocabulary projections; backward = 2x forward), so the FLOP/s figure is a
lower bound on the work the machine does (element-wise gate math, softmax and the optimiser are left out).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from study.config import TrialConfig
from study.data.encoders import pick_device
from study.models import build_captioner

BATCH, STEPS_T, VOCAB, EMBED, FEAT, GRID = 64, 20, 1000, 128, 1280, 49
GATES = {"lstm": 4, "lstm_peephole": 4, "gru": 3}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Best-of fp32 GFLOP/s of an n^3 torch.mm: this machine's practical peak."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def train_flops_per_token(cell: str, hidden: int) -> float:
    """Matmul FLOPs of forward + backward per token (the per-image init projection is amortised over T)."""
    gates = GATES[cell]
    forward = 2 * EMBED * gates * hidden + 2 * hidden * gates * hidden + 2 * hidden * VOCAB
    forward += 2 * FEAT * hidden / STEPS_T
    return 3 * forward


def time_training(cell: str, hidden: int, steps: int, device: torch.device) -> float:
    """Seconds per training step (forward + backward + Adam), median of ``steps`` after 2 warm-up steps."""
    torch.manual_seed(0)
    cfg = TrialConfig(cell=cell, inject="init", hidden=hidden, embed=EMBED, layers=1)
    model = build_captioner(cfg, VOCAB, FEAT).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    pooled = torch.randn(BATCH, FEAT, device=device).half()
    tokens = torch.randint(4, VOCAB, (BATCH, STEPS_T + 1), device=device)
    times = []
    for i in range(steps + 2):
        sync(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = model(pooled, None, tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
        opt.step()
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def time_beam(inject: str, images: int, device: torch.device) -> tuple[float, float, bool]:
    """(batched seconds, per-image seconds, same captions) for beam 3, max_len 20, hidden 256 LSTM."""
    torch.manual_seed(0)
    cfg = TrialConfig(cell="lstm", inject=inject, hidden=256, embed=EMBED, layers=1)
    model = build_captioner(cfg, VOCAB, FEAT).to(device).eval()
    pooled = torch.randn(images, FEAT, device=device).half()
    grid = torch.randn(images, GRID, FEAT, device=device).half()
    model.beam_search(pooled[:2], grid[:2], 3, 20)  # warm-up
    sync(device)
    start = time.perf_counter()
    batched = model.beam_search(pooled, grid, 3, 20)
    sync(device)
    t_batched = time.perf_counter() - start
    start = time.perf_counter()
    single = torch.cat([model.beam_search(pooled[i : i + 1], grid[i : i + 1], 3, 20) for i in range(images)])
    sync(device)
    t_single = time.perf_counter() - start
    return t_batched, t_single, bool((batched == single).float().mean() > 0.99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--cells", nargs="+", default=["lstm", "gru", "lstm_peephole"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:  # on a shared 2-core machine, 1 thread gives steadier numbers than 2 oversubscribed ones
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)

    peak = matmul_peak(device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"fp32 matmul peak (2048^3 torch.mm, best of 5): {peak:.1f} GFLOP/s\n")
    print("training: 1 layer, batch 64, T=20, vocab 1000, embed 128, inject init, Adam")
    print(f"{'cell':<14}{'hidden':>7}{'ms/step':>10}{'tokens/s':>11}{'GFLOP/s':>10}{'% peak':>8}")
    for cell in args.cells:
        for hidden in args.widths:
            step = time_training(cell, hidden, args.steps, device)
            tokens_per_s = BATCH * STEPS_T / step
            gflops = train_flops_per_token(cell, hidden) * tokens_per_s / 1e9
            print(f"{cell:<14}{hidden:>7}{step * 1e3:>10.1f}{tokens_per_s:>11.0f}{gflops:>10.1f}{gflops / peak:>8.1%}")

    print(f"\nbeam search: {args.images} images, beam 3, max_len 20, lstm hidden 256")
    print(f"{'inject':<11}{'batched s':>10}{'per-image s':>13}{'speed-up':>10}{'same':>6}")
    for inject in ["init", "attention"]:
        t_batched, t_single, same = time_beam(inject, args.images, device)
        print(f"{inject:<11}{t_batched:>10.2f}{t_single:>13.2f}{t_single / t_batched:>9.1f}x{str(same):>6}")


if __name__ == "__main__":
    main()
