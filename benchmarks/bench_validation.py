"""Per-epoch validation on a real study's trials: what each part costs, and whether a val-caption subset ranks
the trials as every val caption does (the case for ``val_captions``).

    PYTHONPATH=. python benchmarks/bench_validation.py ~/studies/flickr8k [--captions 1250] [--threads 1]

Loads the newest checkpoint of each of the study's trials (read only), prepares its dataset (the cached
features), and times, as ``run_trial`` does each epoch: the val loss over every val caption and over the first
``--captions`` (``val_captions``: the captions of the first images, in order), greedy decoding of the
``val_images`` images the trial decoded, and their scoring. Then the Spearman correlation, over the trials, of
the subset's val loss with the full split's, and of either with the trials' val CIDEr-D. Also the data loading of
one training epoch alone (``_train_epoch``'s gathering of each batch's tokens and features, no model).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from analysis.metric_table import format_metric
from study.config import checkpoint_config
from study.data.prepare import TokenSetting, prepare
from study.models import build_captioner
from study.trial.checkpoints import load_checkpoint
from study.trial.evaluation import Decoding, FeatureSource, SplitTensors, score_split, validation_loss
from study.trial.training import length_bucketed_batches


def newest_checkpoints(study: Path) -> list[Path]:
    found = []
    for trial in sorted((study / "tune").iterdir()):
        checkpoints = sorted(trial.glob("checkpoint_*/checkpoint.pt"))
        if checkpoints:
            found.append(checkpoints[-1])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--captions", type=int, default=1250, help="val_captions to compare with all")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a trial's resources.cpu)")
    parser.add_argument("--max-trials", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")

    rows, data_by_key = [], {}
    for path in newest_checkpoints(args.study.expanduser())[: args.max_trials]:
        try:
            state = load_checkpoint(path)
        except Exception as exc:  # a checkpoint being written right now
            print(f"skip {path}: {exc}")
            continue
        cfg = checkpoint_config(state["config"], str(path))
        key = (cfg.dataset, cfg.tokens, cfg.effective_max_len, cfg.min_count)
        if key not in data_by_key:
            t0 = time.perf_counter()
            data_by_key[key] = prepare(cfg.dataset, [TokenSetting(cfg.tokens, cfg.effective_max_len, cfg.min_count)],
                                       need_grid=True, progress=False)
            print(f"prepared {cfg.dataset.kind} in {time.perf_counter() - t0:.1f} s")
            data = data_by_key[key]
            train = SplitTensors.of(data.tokens_for(cfg).splits["train"], data.images["train"].rows)
            batches = length_bucketed_batches(train.lengths, cfg.batch_size, np.random.default_rng(0))
            for grid in (False, True):
                gather = FeatureSource(data, dev, need_grid=grid)
                t0 = time.perf_counter()
                for idx in batches:  # as _train_epoch gathers them
                    train.ids[torch.from_numpy(idx), : int(train.lengths[idx].max())].to(dev, non_blocking=True)
                    gather(train.feature_rows[idx])
                print(f"data loading of one training epoch ({len(batches)} batches of {cfg.batch_size}, "
                      f"{'pooled + grid' if grid else 'pooled'} features): {time.perf_counter() - t0:.2f} s")
        data = data_by_key[key]
        tokens = data.tokens_for(cfg)
        model = build_captioner(cfg, len(tokens.vocab), data.feature_dim, data.feature_stats)
        model.load_state_dict(state["model"])
        features = FeatureSource(data, dev, need_grid=model.needs_grid)
        rows_val = data.images["val"].rows

        def timed(fn):
            t0 = time.perf_counter()
            out = fn()
            return out, time.perf_counter() - t0

        full_split = SplitTensors.of(tokens.splits["val"], rows_val)
        sub_split = SplitTensors.of(tokens.splits["val"], rows_val, limit=args.captions)
        (full, _), full_s = timed(lambda: validation_loss(model, full_split, features, dev, cfg.batch_size))
        (sub, _), sub_s = timed(lambda: validation_loss(model, sub_split, features, dev, cfg.batch_size))
        greedy = score_split(model, data, "val", vocab=tokens.vocab, decoding=Decoding.of(cfg, beam_size=1),
                             limit=cfg.val_images)  # as each epoch validates
        n, scores = len(greedy.captions), greedy.scores
        decode_s, metric_s = greedy.decode_seconds, greedy.metric_seconds
        rows.append((path.parents[1].name, state["epoch"], len(full_split.lengths), full, full_s,
                     len(sub_split.lengths), sub, sub_s, n, decode_s, metric_s, scores["CIDEr-D"]))
        print(f"{rows[-1][0]:<40} epoch {rows[-1][1]}: val loss all {full:.4f} ({full_s:.2f} s), first "
              f"{args.captions} {sub:.4f} ({sub_s:.2f} s); decode {n} images {decode_s:.2f} s, "
              f"metrics {metric_s:.2f} s, CIDEr-D {format_metric('CIDEr-D', scores['CIDEr-D'])}", flush=True)

    if not rows:
        raise SystemExit("no readable checkpoint")
    cols = list(zip(*rows))
    print(f"\ntrials: {len(rows)}; val captions all {rows[0][2]} vs first {rows[0][5]}")
    print(f"seconds per epoch (median): val loss all {np.median(cols[4]):.2f}, val loss first {args.captions} "
          f"{np.median(cols[7]):.2f}, decoding {np.median(cols[9]):.2f}, metrics {np.median(cols[10]):.2f}")
    if len(rows) >= 3:
        print(f"Spearman over trials: subset vs all val loss {spearmanr(cols[3], cols[6])[0]:.3f}; "
              f"val loss all vs CIDEr-D {spearmanr(cols[3], cols[11])[0]:.3f}, "
              f"subset vs CIDEr-D {spearmanr(cols[6], cols[11])[0]:.3f}")
        order_all, order_sub = np.argsort(cols[3]), np.argsort(cols[6])
        print(f"best trial by val loss: all {rows[order_all[0]][0]}, subset {rows[order_sub[0]][0]}")


if __name__ == "__main__":
    main()
