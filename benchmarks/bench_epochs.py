"""One full-Flickr8k epoch of each injection method, as the study trains it: seconds and tokens/s.

    PYTHONPATH=. python benchmarks/bench_epochs.py [--methods init pre par merge attention none]
                                                   [--precision auto] [--threads 1] [--markdown]

Each method's configuration is the committed Flickr8k study's confirm configuration
(``results/flickr8k/confirm_runs.csv``, rank 1), trained for one epoch of its cosine schedule (``epochs: 1``)
through ``run_trial`` on the 6000 training photos (30k captions), then validated as the study validates (loss
over every val caption, greedy CIDEr-D of 250 val photos). ``--precision`` is ignored by code from before the
setting existed, so the same script times the code before and after it (run it from a checkout of each).
"""

from __future__ import annotations

import argparse
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
from study.trial.training import run_trial

ROOT = Path(__file__).resolve().parents[1]
CONFIRM = ROOT / "results" / "flickr8k" / "confirm_runs.csv"


def method_configs(methods: list[str], precision: str) -> dict[str, TrialConfig]:
    spec = load_spec(ROOT / "search_spaces" / "flickr8k.yaml")
    committed = pd.read_csv(CONFIRM)
    fields = set(TrialConfig.model_fields) - {"dataset", "epochs"}
    configs = {}
    for method in methods:
        row = committed[(committed["method"] == method) & (committed["config_rank"] == 1)].iloc[0]
        values = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()
                  if k in fields and not pd.isna(v)}
        if "precision" in TrialConfig.model_fields:
            values["precision"] = precision
        configs[method] = TrialConfig(**{**values, "dataset": spec.dataset, "epochs": 1})
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["init", "pre", "par", "merge", "attention", "none"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = method_configs(args.methods, args.precision)
    first = next(iter(configs.values()))
    data = prepare(first.dataset, [TokenSetting.of(first)], need_grid=True, progress=False)
    print(f"torch {torch.__version__}, {args.threads} thread(s), precision {args.precision}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| method | configuration | precision | train s | validation s | epoch s | tokens/s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for method, cfg in configs.items():
        with tempfile.TemporaryDirectory(prefix="epoch-") as tmp:
            t0 = time.perf_counter()
            result = run_trial(cfg, data, work_dir=Path(tmp), progress=False)
            wall = time.perf_counter() - t0
        epoch = result.epochs[0]
        ran = result.precision
        print(f"| {method} | {cfg.cell} {cfg.layers}x{cfg.hidden} | {ran} | {epoch['train_seconds']:.0f} "
              f"| {epoch['epoch_seconds'] - epoch['train_seconds']:.0f} | {wall:.0f} "
              f"| {epoch['tokens_per_second']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
