"""Does bf16 change what a trial learns? fp32 against bf16 on full Flickr8k, paired by seed.

    PYTHONPATH=. python benchmarks/precision_quality.py run --out ~/precision-quality [--methods init attention]
                                                           [--seeds 3] [--threads 1] [--only METHOD:PRECISION:SEED]
    PYTHONPATH=. python benchmarks/precision_quality.py table --out ~/precision-quality

Each run is the committed Flickr8k study's confirm configuration of the method (``results/flickr8k/
confirm_runs.csv``, rank 1: GRU 1 x 512 for init and attention), trained 5 epochs through ``run_trial`` with
seed 1000 + k at ``precision`` fp32 and bf16, then the 1000 test photos decoded with beam 3 (under the same
precision) and scored with the full coco-caption suite, per image. Each finished run is one JSON in ``--out``,
so the script resumes: ``run`` skips finished runs, and two ``run`` processes with different ``--only`` lists
share the work. ``table`` prints, per seed, the last epoch's val loss and greedy val CIDEr-D (250 val photos,
as the study validates), test CIDEr-D and BLEU-4, and the seconds an epoch took; then the paired bf16 - fp32
difference of each method (mean over seeds with a t interval over seeds, and a bootstrap interval over the
test images of the seed-mean per-image CIDEr-D), beside the seed-to-seed sd of fp32: the noise bf16 must stay
within to become ``auto``'s default.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from study.config import TrialConfig
from study.data.prepare import TokenSetting, prepare
from study.spec import load_spec
from study.trial.evaluation import Decoding, score_split
from study.trial.training import run_trial

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "search_spaces" / "flickr8k.yaml"
CONFIRM = ROOT / "results" / "flickr8k" / "confirm_runs.csv"
PRECISIONS = ("fp32", "bf16")
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # two-sided 95% t quantiles by degrees of freedom


def configs(methods: list[str], seeds: int) -> dict[str, TrialConfig]:
    """``METHOD:PRECISION:SEED`` -> its trial config: the committed confirm configuration, seed 1000 + k."""
    spec = load_spec(SPEC)
    committed = pd.read_csv(CONFIRM)
    fields = set(TrialConfig.model_fields) - {"dataset", "seed", "precision"}
    out = {}
    for method in methods:
        row = committed[(committed["method"] == method) & (committed["config_rank"] == 1)].iloc[0]
        values = {k: row[k] for k in fields if k in row and not pd.isna(row[k])}
        values = {k: (bool(v) if isinstance(v, np.bool_) else v.item() if hasattr(v, "item") else v)
                  for k, v in values.items()}
        for precision in PRECISIONS:
            for k in range(seeds):
                out[f"{method}:{precision}:{k}"] = TrialConfig(
                    **{**values, "dataset": spec.dataset, "seed": 1000 + k, "precision": precision})
    return out


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    todo = {key: cfg for key, cfg in configs(args.methods, args.seeds).items()
            if (not args.only or key in args.only) and not (out / f"{key.replace(':', '-')}.json").exists()}
    if not todo:
        print("every run is finished")
        return
    first = next(iter(todo.values()))
    data = prepare(first.dataset, [TokenSetting.of(first)], need_grid=True, progress=False)
    for key, cfg in todo.items():
        t0 = time.perf_counter()
        print(f"{key}: {cfg.run_name}, load average {os.getloadavg()[0]:.2f}", flush=True)
        with tempfile.TemporaryDirectory(prefix="precision-") as tmp:
            result = run_trial(cfg, data, work_dir=Path(tmp), progress=False)
        test = score_split(result.model, data, "test", vocab=data.tokens_for(cfg).vocab,
                           decoding=Decoding.of(cfg.model_copy(update={"precision": result.precision})), full=True,
                           per_image=True)
        record = {"key": key, "method": cfg.inject, "precision": result.precision, "seed": cfg.seed,
                  "threads": args.threads, "epochs": result.epochs, "test": test.scores,
                  "test_decode_seconds": test.decode_seconds,
                  "per_image_cider": [test.per_image["CIDEr-D"][i] for i in range(len(test.captions))],
                  "seconds": time.perf_counter() - t0}
        path = out / f"{key.replace(':', '-')}.json"
        path.write_text(json.dumps(record, default=float))
        last = result.epochs[-1]
        print(f"  val loss {last['val_loss']:.4f}, val CIDEr-D {100 * last['val_CIDEr-D']:.1f}, test CIDEr-D "
              f"{100 * test.scores['CIDEr-D']:.1f} ({record['seconds']:.0f} s) -> {path}", flush=True)


def t_interval(values: np.ndarray) -> tuple[float, float, float]:
    """(mean, lo, hi): the 95% t interval of the mean (NaN bounds with one value)."""
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = T_975.get(len(values) - 1, 1.96) * float(values.std(ddof=1)) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def bootstrap(diff: np.ndarray, draws: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of per-image differences, resampling images."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(draws, len(diff)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def table(args: argparse.Namespace) -> None:
    records = [json.loads(p.read_text()) for p in sorted(Path(args.out).expanduser().glob("*.json"))]
    if not records:
        raise SystemExit(f"no finished runs in {args.out}")
    rows = []
    for r in records:
        last = r["epochs"][-1]
        rows.append({"method": r["method"], "precision": r["precision"], "seed": r["seed"],
                     "val loss": last["val_loss"], "val CIDEr-D": 100 * last["val_CIDEr-D"],
                     "test CIDEr-D": 100 * r["test"]["CIDEr-D"], "test BLEU-4": 100 * r["test"]["BLEU-4"],
                     "s/epoch": float(np.mean([e["epoch_seconds"] for e in r["epochs"]])),
                     "train s/epoch": float(np.mean([e["train_seconds"] for e in r["epochs"]]))})
    frame = pd.DataFrame(rows).sort_values(["method", "seed", "precision"])
    print("| method | seed | precision | val loss | val CIDEr-D | test CIDEr-D | test BLEU-4 | train s/epoch |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for _, r in frame.iterrows():
        print(f"| {r['method']} | {r['seed']} | {r['precision']} | {r['val loss']:.4f} | {r['val CIDEr-D']:.1f} "
              f"| {r['test CIDEr-D']:.1f} | {r['test BLEU-4']:.1f} | {r['train s/epoch']:.0f} |")
    print()
    print("| method | seeds | bf16 - fp32 val loss | bf16 - fp32 test CIDEr-D (t 95%, seeds) | "
          "bootstrap 95% (images) | fp32 seed sd | train speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    by_key = {(r["method"], r["precision"], r["seed"]): r for r in records}
    for method in sorted({r["method"] for r in records}):
        seeds = sorted(s for (m, p, s) in by_key if m == method and p == "fp32" and (m, "bf16", s) in by_key)
        if not seeds:
            continue
        pairs = [(by_key[(method, "fp32", s)], by_key[(method, "bf16", s)]) for s in seeds]
        d_cider = np.array([100 * (b["test"]["CIDEr-D"] - a["test"]["CIDEr-D"]) for a, b in pairs])
        d_loss = np.array([b["epochs"][-1]["val_loss"] - a["epochs"][-1]["val_loss"] for a, b in pairs])
        per_image = np.mean([np.array(b["per_image_cider"]) - np.array(a["per_image_cider"]) for a, b in pairs],
                            axis=0) * 100
        lo_b, hi_b = bootstrap(per_image)
        mean, lo, hi = t_interval(d_cider)
        fp32 = np.array([100 * a["test"]["CIDEr-D"] for a, _ in pairs])
        sd = float(fp32.std(ddof=1)) if len(fp32) > 1 else math.nan
        speed = np.mean([np.mean([e["train_seconds"] for e in a["epochs"]]) /
                         np.mean([e["train_seconds"] for e in b["epochs"]]) for a, b in pairs])
        print(f"| {method} | {len(seeds)} | {d_loss.mean():+.4f} | {mean:+.1f} [{lo:+.1f}, {hi:+.1f}] | "
              f"[{lo_b:+.1f}, {hi_b:+.1f}] | {sd:.1f} | {speed:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "table"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True, help="folder of the per-run JSON files (outside the work tree)")
    runner = sub.choices["run"]
    runner.add_argument("--methods", nargs="+", default=["init", "attention"])
    runner.add_argument("--seeds", type=int, default=3)
    runner.add_argument("--threads", type=int, default=1)
    runner.add_argument("--only", nargs="*", default=[], help="METHOD:PRECISION:SEED keys to run (default: all)")
    args = parser.parse_args()
    run(args) if args.command == "run" else table(args)


if __name__ == "__main__":
    main()
