"""Model speed: training tokens/s per cell and width at fp32 and bf16, achieved FLOP/s against the measured
matmul peak of that precision, and batched vs per-image beam search.

    PYTHONPATH=. python benchmarks/bench_models.py [--widths 256 512 1024] [--precisions fp32 bf16] [--steps 10]
                                                   [--images 100] [--threads 1] [--skip-beam]

Training setup (the study's defaults for a word model): 1 layer, batch 64, T = 20, vocab 1000, embed 128,
1280-d image features (EfficientNet-lite0), inject ``init`` for each cell, and ``attention`` (GRU,
attention_dim 256, 7 x 7 grid) as a fourth row; Adam; bf16 is ``torch.autocast`` around the forward pass, as
training runs it (``study.trial.precision``). FLOPs are counted analytically for the matmuls only (input, recurrent,
attention and vocabulary projections; backward = 2x forward), so the FLOP/s figure is a lower bound on the work
the machine does (element-wise gate math, softmax, dropout and the optimiser are left out). The peak is the best
``torch.mm`` of 512^3, 1024^3 and 2048^3 in that dtype: what this CPU's matmul kernels reach, not a datasheet
number.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from study.config import TrialConfig
from study.data.encoders import pick_device
from study.models import build_captioner
from study.trial.precision import autocast

BATCH, STEPS_T, VOCAB, EMBED, FEAT, GRID, ATTENTION = 64, 20, 1000, 128, 1280, 49, 256
GATES = {"lstm": 4, "lstm_peephole": 4, "gru": 3}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (row name, cell, inject): each cell with init, and attention on the GRU (the study's best attention cell)
ROWS = [("lstm", "lstm", "init"), ("gru", "gru", "init"), ("lstm_peephole", "lstm_peephole", "init"),
        ("attention (gru)", "gru", "attention")]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, precision: str = "fp32", sizes: tuple[int, ...] = (512, 1024, 2048),
                repeats: int = 5) -> float:
    """Best GFLOP/s of an n^3 torch.mm in ``precision``'s dtype over a few sizes (best of ``repeats`` each): this
    machine's practical peak. One 2048^3 product alone under-reads it on this CPU (its operands spill the cache:
    the fused LSTM then measured 130% of that "peak")."""
    dtype = DTYPES[precision]
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)
        sync(device)
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def train_flops_per_token(cell: str, inject: str, hidden: int) -> float:
    """Matmul FLOPs of forward + backward per token (per-image projections amortised over T)."""
    gates = GATES[cell]
    rnn_input = EMBED + (FEAT if inject == "attention" else 0)
    forward = 2 * rnn_input * gates * hidden + 2 * hidden * gates * hidden + 2 * hidden * VOCAB
    if inject == "attention":  # query, scores over the grid, context; keys once per image
        forward += 2 * hidden * ATTENTION + 2 * GRID * ATTENTION + 2 * GRID * FEAT
        forward += 2 * GRID * FEAT * ATTENTION / STEPS_T
    else:
        forward += 2 * FEAT * hidden / STEPS_T
    return 3 * forward


def time_training(cell: str, inject: str, hidden: int, precision: str, steps: int, device: torch.device) -> float:
    """Seconds per training step (forward + backward + Adam), median of ``steps`` after 2 warm-up steps."""
    torch.manual_seed(0)
    cfg = TrialConfig(cell=cell, inject=inject, hidden=hidden, embed=EMBED, layers=1, attention_dim=ATTENTION)
    model = build_captioner(cfg, VOCAB, FEAT).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    pooled = torch.randn(BATCH, FEAT, device=device).half()
    grid = torch.randn(BATCH, GRID, FEAT, device=device).half() if model.needs_grid else None
    tokens = torch.randint(4, VOCAB, (BATCH, STEPS_T + 1), device=device)
    times = []
    for i in range(steps + 2):
        sync(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            logits = model(pooled, grid, tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, VOCAB).float(), tokens[:, 1:].reshape(-1)).backward()
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
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--rows", nargs="+", default=[name for name, _, _ in ROWS], help="which rows to time")
    parser.add_argument("--skip-beam", action="store_true", help="training rows only")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:  # on a shared 2-core machine, 1 thread gives steadier numbers than 2 oversubscribed ones
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)

    peaks = {precision: matmul_peak(device, precision) for precision in args.precisions}
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("matmul peak (best torch.mm of 512^3, 1024^3, 2048^3): "
          + ", ".join(f"{p} {peak:.1f} GFLOP/s" for p, peak in peaks.items()) + "\n")
    print("training: 1 layer, batch 64, T=20, vocab 1000, embed 128, Adam (fused); bf16 = autocast")
    print("| row | hidden | precision | ms/step | tokens/s | GFLOP/s | share of that precision's peak |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name, cell, inject in ROWS:
        if name not in args.rows:
            continue
        for hidden in args.widths:
            for precision in args.precisions:
                step = time_training(cell, inject, hidden, precision, args.steps, device)
                tokens_per_s = BATCH * STEPS_T / step
                gflops = train_flops_per_token(cell, inject, hidden) * tokens_per_s / 1e9
                print(f"| {name} | {hidden} | {precision} | {step * 1e3:.1f} | {tokens_per_s:.0f} | {gflops:.1f} "
                      f"| {gflops / peaks[precision]:.1%} |", flush=True)
    if args.skip_beam:
        return

    print(f"\nbeam search: {args.images} images, beam 3, max_len 20, lstm hidden 256")
    print(f"{'inject':<11}{'batched s':>10}{'per-image s':>13}{'speed-up':>10}{'same':>6}")
    for inject in ["init", "attention"]:
        t_batched, t_single, same = time_beam(inject, args.images, device)
        print(f"{inject:<11}{t_batched:>10.2f}{t_single:>13.2f}{t_single / t_batched:>9.1f}x{str(same):>6}")


if __name__ == "__main__":
    main()
