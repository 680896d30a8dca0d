"""What the study platform costs around training: per-trial overhead, MLflow per result, memory of
concurrent trials, and ASHA against no early stopping.

    python benchmarks/bench_study.py overhead [--trials 8] [--epochs 3] [--images 300]
    python benchmarks/bench_study.py mlflow   [--results 200 2000]
    python benchmarks/bench_study.py memory   [--images 240 1600] [--concurrent 1 2] [--epochs 2]
    python benchmarks/bench_study.py asha     [--trials 10] [--epochs 6] [--images 300]

Every study is a real ``tuning.run_study`` on ``shapes`` data (CPU, ``resources.cpu: 1``), in a temporary
storage folder, with the features cached in the default cache (reused between runs).

* ``overhead``: a trial's wall time (driver-side ``on_trial_start`` -> ``on_trial_complete``) minus the sum
  of the ``epoch_seconds`` its loop reported; also Tune's ``time_total_s`` minus the same sum (the part spent
  inside the trainable: model build, checkpoints, ``tune.report``), and the study tracker's MLflow seconds.
* ``mlflow``: ``StudyTracker.trial_result`` on a sqlite store, per call, early and late in a long journal.
* ``memory``: N concurrent trials of an ``attention`` spec (the grid features, (N_img, 49, 1280) fp16, are
  shipped); a thread samples every trial worker's RSS / PSS / USS (psutil) and, from ``/proc/PID/smaps``,
  its anonymous (private heap) memory and the resident part of its object-store mapping. If the features
  are mapped from the object store, the anonymous memory does not grow with the feature size.
* ``asha``: one random-search spec run with ASHA and without (same seed, so the same configurations,
  checked); epochs trained, wall time, and the best configuration of each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import psutil  # noqa: E402
import yaml  # noqa: E402

from study import tuning  # noqa: E402
from study.context import StudyContext  # noqa: E402
from study.records.trial_tables import load_trial_tables  # noqa: E402
from study.spec import load_spec  # noqa: E402
from study.tracking import StudyTracker  # noqa: E402
from study.tracking.mlflow_store import MlflowStore  # noqa: E402
from study.tuning import callbacks, ray_compat, runner  # noqa: E402

FIXED = {"cell": "lstm", "layers": 1, "tokens": "word", "min_count": 1, "embed": 32, "hidden": 64,
         "batch_size": 40, "val_images": 30, "schedule": "cosine"}


# ----- running one study -------------------------------------------------------------------------------
EVENTS: dict[str, Any] = {}  # filled by TimingCallback in the driver (Tune may pickle the callback itself)


class TimingCallback(callbacks.TrackingCallback):
    """The study's own callback plus driver-side wall-clock times of each trial's start and end."""

    def __init__(self, tracker, spec, echo=None):
        super().__init__(tracker, spec, echo)
        EVENTS["tracker"] = tracker
        EVENTS["start"], EVENTS["end"], EVENTS["results"] = {}, {}, {}

    def on_trial_start(self, iteration, trials, trial, **info):
        EVENTS["start"][trial.trial_id] = time.time()
        super().on_trial_start(iteration, trials, trial, **info)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        EVENTS["results"].setdefault(trial.trial_id, []).append(dict(result))
        super().on_trial_result(iteration, trials, trial, result, **info)

    def on_trial_complete(self, iteration, trials, trial, **info):
        EVENTS["end"][trial.trial_id] = time.time()
        super().on_trial_complete(iteration, trials, trial, **info)


def shapes(images: int, image_size: int = 96, seed: int = 0) -> dict[str, Any]:
    # Default cache dir: the features of a size are computed once and reused by later runs.
    return {"kind": "shapes", "images": images, "image_size": image_size, "seed": seed}


def run(folder: Path, name: str, *, dataset: dict, fixed: dict, space: dict, trials: int, epochs: int,
        algorithm: str = "random", seed: int = 0, asha: dict | None = None, max_concurrent: int | None = None,
        stratify: str | None = None):
    """Write a spec, run the study in-process, return (outcome, spec, wall seconds)."""
    spec_dict = {
        "name": name, "dataset": dataset, "fixed": fixed, "space": space, "stratify": stratify,
        "search": {"algorithm": algorithm, "trials": trials, "seed": seed, "max_concurrent": max_concurrent},
        "asha": asha or {"enabled": False, "max_epochs": epochs, "grace_period": epochs},
        "resources": {"cpu": 1}, "storage": str(folder / "runs"), "max_failures": 0,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec_dict))
    spec = load_spec(path)
    runner.TrackingCallback = TimingCallback  # run_study builds its callback from this module global
    EVENTS["t0"] = time.time()
    t0 = time.perf_counter()
    try:
        outcome = tuning.run_study(StudyContext.from_spec(spec, path), progress=False, verbose=0)
        EVENTS["returned"] = time.time()
    finally:
        tuning.shutdown()
    return outcome, spec, time.perf_counter() - t0


SENDS: dict[str, list[float]] = {}  # seconds of MlflowStore.send per event kind


def _timed_send(self, event):
    t0 = time.perf_counter()
    try:
        return _original_send(self, event)
    finally:
        SENDS.setdefault(event["kind"], []).append(time.perf_counter() - t0)


_original_send = MlflowStore.send
MlflowStore.send = _timed_send  # measure only; the store's behaviour is unchanged

STEPS: dict[str, list[float]] = {}  # seconds of the driver-side steps of run_study, in call order


def _timed(name: str, func):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            STEPS.setdefault(name, []).append(time.perf_counter() - t0)
    return wrapper


runner.prepare_for_spec = _timed("prepare", runner.prepare_for_spec)
ray_compat.ensure_ray = _timed("ray.init", ray_compat.ensure_ray)
StudyTracker.flush = _timed("tracker.flush", StudyTracker.flush)


def prepare_only(dataset: dict, need_grid: bool) -> None:
    """Extract (or find) the features before timing anything."""
    from study.config import ShapesDataset
    from study.data.prepare import prepare

    prepare(ShapesDataset(**{k: v for k, v in dataset.items() if k != "kind"}), [], need_grid=need_grid,
            progress=False)


def summary(values: list[float]) -> str:
    return f"mean {statistics.mean(values):6.2f}  median {statistics.median(values):6.2f}  " \
           f"min {min(values):6.2f}  max {max(values):6.2f}"


# ----- 1. per-trial overhead ---------------------------------------------------------------------------
def bench_overhead(args) -> None:
    dataset = shapes(args.images)
    prepare_only(dataset, need_grid=False)
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        outcome, spec, wall = run(
            Path(tmp), "overhead", dataset=dataset, fixed=FIXED, trials=args.trials, epochs=args.epochs,
            space={"inject": {"choice": ["init", "merge"]}, "lr": {"loguniform": [3e-3, 1e-2]}})
        rows = []
        for trial_id, results in EVENTS["results"].items():
            epochs = sum(r["epoch_seconds"] for r in results)
            wall_trial = EVENTS["end"][trial_id] - EVENTS["start"][trial_id]
            rows.append((trial_id, len(results), epochs, wall_trial, results[-1]["time_total_s"]))
        rows.sort(key=lambda r: EVENTS["start"][r[0]])
    tracker = EVENTS["tracker"]
    print(f"study: {len(rows)} trials x {args.epochs} epochs, {args.images} shapes images, 2 at a time, "
          f"reuse_actors=True; run_study wall {wall:.1f} s (incl. prepare + Ray start)")
    starts, ends = sorted(EVENTS["start"].values()), sorted(EVENTS["end"].values())
    overlap = max(sum(EVENTS["start"][t] <= s < EVENTS["end"][t] for t in EVENTS["start"]) for s in starts)
    print(f"timeline: run_study -> first trial start {starts[0] - EVENTS['t0']:.1f} s; trials running "
          f"{ends[-1] - starts[0]:.1f} s (at most {overlap} at once); last trial end -> run_study returns "
          f"{EVENTS['returned'] - ends[-1]:.1f} s")
    print(f"{'trial':>12} {'start_s':>7} {'epochs':>6} {'sum epoch_s':>11} {'wall_s':>7} {'overhead_s':>10} "
          f"{'time_total_s':>12} {'in-trainable':>12}")
    for trial_id, n, epochs, wall_trial, total in rows:
        print(f"{trial_id:>12} {EVENTS['start'][trial_id] - starts[0]:>7.1f} {n:>6} {epochs:>11.2f} "
              f"{wall_trial:>7.2f} {wall_trial - epochs:>10.2f} "
              f"{total:>12.2f} {total - epochs:>12.2f}")
    over = [w - e for _, _, e, w, _ in rows]
    inside = [t - e for _, _, e, _, t in rows]
    print(f"overhead per trial (wall - epochs):        {summary(over)}")
    print(f"  first 2 trials (new actors): {[round(v, 2) for v in over[:2]]}; reused actors: "
          f"{summary(over[2:]) if len(over) > 2 else '-'}")
    print(f"inside the trainable (time_total_s - epochs): {summary(inside)}")
    epoch_sum = sum(r[2] for r in rows)
    print(f"sum of epoch seconds {epoch_sum:.1f} s; sum of trial walls {sum(r[3] for r in rows):.1f} s; "
          f"overhead share {100 * (1 - epoch_sum / sum(r[3] for r in rows)):.1f}%")
    print(f"MLflow (sqlite) in the study: {tracker.events_sent} events, {tracker.seconds_in_mlflow:.2f} s, "
          f"{1000 * tracker.seconds_in_mlflow / max(tracker.events_sent, 1):.1f} ms/event")
    flushes = STEPS["tracker.flush"]
    print(f"  tracker.flush calls: {len(flushes)}, first {flushes[0]:.2f} s (imports mlflow, creates the sqlite "
          f"tables), the rest {sum(flushes[1:]):.2f} s; prepare {STEPS['prepare'][0]:.2f} s, ray.init "
          f"{STEPS['ray.init'][0]:.2f} s")
    for kind, seconds in SENDS.items():
        print(f"  {kind:>13}: {len(seconds):>3} events, {1000 * statistics.mean(seconds):7.1f} ms each "
              f"(max {1000 * max(seconds):.0f} ms)")


# ----- MLflow micro-benchmark --------------------------------------------------------------------------
def bench_mlflow(args) -> None:
    from study.records.paths import sqlite_uri
    from study.tracking import StudyTracker

    metrics = {"train_loss": 2.5, "val_loss": 2.7, "val_bpc": 1.1, "val_CIDEr-D": 0.3, "val_BLEU-4": 0.1,
               "current_lr": 1e-3, "train_seconds": 3.0, "epoch_seconds": 3.5, "tokens_per_second": 9000.0,
               "params": 120000}
    print(f"{'results':>8} {'ms/result (call)':>17} {'ms/event in MLflow':>19} {'first 100 ms':>13} "
          f"{'last 100 ms':>12}")
    for n in args.results:
        with tempfile.TemporaryDirectory(prefix="bench-mlflow-") as tmp:
            folder = Path(tmp)
            tracker = StudyTracker(sqlite_uri(folder / "mlflow.db"), "bench", "bench", folder)
            tracker.start_study({"trials": 4}, {"git_commit": "x"})
            for t in range(4):
                tracker.trial_started(f"t{t}", f"trial-{t}", {"lr": 0.001, "hidden": 64})
            seconds0, events0 = tracker.seconds_in_mlflow, tracker.events_sent
            calls = []
            for i in range(n):
                t0 = time.perf_counter()
                tracker.trial_result(f"t{i % 4}", {**metrics, "val_loss": 2.7 - i * 1e-4}, step=i // 4 + 1)
                calls.append(time.perf_counter() - t0)
            in_mlflow = (tracker.seconds_in_mlflow - seconds0) / (tracker.events_sent - events0)
            print(f"{n:>8} {1000 * statistics.mean(calls):>17.2f} {1000 * in_mlflow:>19.2f} "
                  f"{1000 * statistics.mean(calls[:100]):>13.2f} {1000 * statistics.mean(calls[-100:]):>12.2f}")


# ----- 2. memory of concurrent trials ------------------------------------------------------------------
def _smaps(pid: int) -> tuple[int, int]:
    """(anonymous bytes, resident bytes of object-store mappings) of a process, from /proc/PID/smaps."""
    anon = store = 0
    in_store = False
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            first = line.split(maxsplit=1)[0]
            if not first.endswith(":"):  # a mapping header: "addr perms offset dev inode [path]"
                parts = line.split()
                path = parts[5] if len(parts) > 5 else ""
                in_store = "plasma" in path or path.startswith("/dev/shm")
            elif first == "Anonymous:":
                anon += int(line.split()[1]) * 1024
            elif first == "Rss:" and in_store:
                store += int(line.split()[1]) * 1024
    return anon, store


class Sampler(threading.Thread):
    """Every `period` s: memory of each Ray trial worker (and of this driver); keeps each process's peak."""

    def __init__(self, period: float = 0.5):
        super().__init__(daemon=True)
        self.period = period
        self.peak: dict[int, dict[str, Any]] = {}
        self.done = threading.Event()

    def _workers(self) -> list[psutil.Process]:
        # Only this driver's Ray (other people's studies may run on the machine too).
        me = psutil.Process()
        found = [me]
        for proc in me.children(recursive=True):
            try:
                if " ".join(proc.cmdline()).startswith("ray::ImplicitFunc"):
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    def run(self) -> None:
        while not self.done.is_set():
            for proc in self._workers():
                try:
                    full = proc.memory_full_info()
                    anon, store = _smaps(proc.pid)
                    title = " ".join(proc.cmdline())[:40]
                except (psutil.Error, OSError):
                    continue
                now = {"rss": full.rss, "pss": full.pss, "uss": full.uss, "anon": anon, "store": store}
                peak = self.peak.setdefault(proc.pid, {"title": title, **now})
                for key, value in now.items():
                    peak[key] = max(peak[key], value)
                peak["title"] = title
            self.done.wait(self.period)


def bench_memory(args) -> None:
    MB = 1 << 20
    fixed = {**FIXED, "inject": "attention", "attention_dim": 32, "val_images": 20}
    print(f"{'images':>6} {'grid MB':>8} {'N':>2} {'process':>22} {'RSS MB':>7} {'PSS MB':>7} {'USS MB':>7} "
          f"{'anon MB':>8} {'store-mapped MB':>16}")
    for images in args.images:
        dataset = shapes(images)
        prepare_only(dataset, need_grid=True)
        grid_mb = images * 49 * 1280 * 2 / MB
        for n in args.concurrent:
            sampler = Sampler()
            sampler.start()
            with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
                run(Path(tmp), f"memory-{images}-{n}", dataset=dataset, fixed=fixed, trials=n, epochs=args.epochs,
                    space={"lr": {"loguniform": [3e-3, 1e-2]}}, max_concurrent=n)
            sampler.done.set()
            sampler.join()
            # An actor Tune started but then replaced by a reused one never maps the data: not a trial.
            idle = [p for pid, p in sampler.peak.items() if pid != os.getpid() and p["store"] == 0]
            trials = [p for pid, p in sampler.peak.items() if pid != os.getpid() and p["store"] > 0]
            for label, peak in [("driver", sampler.peak[os.getpid()])] + [(f"trial {i + 1}", p)
                                                                         for i, p in enumerate(trials)]:
                print(f"{images:>6} {grid_mb:>8.1f} {n:>2} {label:>22} {peak['rss'] / MB:>7.0f} "
                      f"{peak['pss'] / MB:>7.0f} {peak['uss'] / MB:>7.0f} {peak['anon'] / MB:>8.0f} "
                      f"{peak['store'] / MB:>16.0f}")
            uss = sum(p["uss"] for p in trials) / MB
            anon = sum(p["anon"] for p in trials) / MB
            print(f"{'':>6} {'':>8} {n:>2} {'trials total':>22} {'':>7} {'':>7} {uss:>7.0f} {anon:>8.0f}")
            for peak in idle:
                print(f"{'':>6} {'':>8} {n:>2} {'(actor, no data)':>22} {peak['rss'] / MB:>7.0f} "
                      f"{peak['pss'] / MB:>7.0f} {peak['uss'] / MB:>7.0f} {peak['anon'] / MB:>8.0f}")
            sys.stdout.flush()


# ----- 3. ASHA against no early stopping ---------------------------------------------------------------
def _configs(outcome, spec) -> list[tuple]:
    table = outcome.trials
    keys = sorted(spec.space)
    return sorted(tuple(round(v, 12) if isinstance(v, float) else v for v in row) for row in
                  table[keys].itertuples(index=False, name=None))


def bench_asha(args) -> None:
    dataset = shapes(args.images)
    prepare_only(dataset, need_grid=False)
    space = {"inject": {"choice": ["init", "par", "merge"]}, "hidden": {"choice": [32, 64]},
             "lr": {"loguniform": [1e-3, 2e-2]}}
    runs = {}
    for label, asha in [("no stopping", {"enabled": False, "max_epochs": args.epochs, "grace_period": 2}),
                        ("ASHA", {"enabled": True, "max_epochs": args.epochs, "grace_period": args.grace,
                                  "reduction_factor": args.reduction})]:
        with tempfile.TemporaryDirectory(prefix="bench-asha-") as tmp:
            outcome, spec, wall = run(Path(tmp), "asha", dataset=dataset, space=space,
                                      fixed={k: v for k, v in FIXED.items() if k != "hidden"},
                                      trials=args.trials, epochs=args.epochs, asha=asha)
            _, history = load_trial_tables(spec)
        runs[label] = (outcome, spec, wall, history)
    (fifo, spec, _, fifo_hist), (asha_out, _, _, asha_hist) = runs["no stopping"], runs["ASHA"]
    same = _configs(fifo, spec) == _configs(asha_out, spec)
    print(f"{args.trials} trials x {args.epochs} epochs, random search seed 0, {args.images} shapes images; "
          f"ASHA grace {args.grace}, reduction {args.reduction}; same configurations in both runs: {same}")
    keys = sorted(spec.space)
    print(f"{'run':>12} {'epochs':>6} {'train s (sum epoch_s)':>22} {'wall s':>7} {'best ' + spec.metric:>17}  "
          f"best config")
    for label, (outcome, _, wall, history) in runs.items():
        table = outcome.trials
        best = table.sort_values(spec.metric).iloc[-1]
        config = {k: (round(float(best[k]), 5) if isinstance(best[k], float) else getattr(best[k], "item",
                  lambda v=best[k]: v)()) for k in keys}
        print(f"{label:>12} {int(table['epochs'].sum()):>6} {history['epoch_seconds'].sum():>22.1f} "
              f"{wall:>7.1f} {best[spec.metric]:>17.4f}  {config}")
    # Where did the no-stopping winner end up under ASHA? Same configuration = same seeded training curve.
    fifo_best = fifo.trials.sort_values(spec.metric).iloc[-1]
    match = asha_out.trials
    for k in keys:
        match = match[(match[k] - fifo_best[k]).abs() < 1e-9] if isinstance(fifo_best[k], float) \
            else match[match[k] == fifo_best[k]]
    if len(match):
        row = match.iloc[0]
        print(f"no-stopping winner under ASHA: {row['status']} after {row['epochs']} epochs, "
              f"best {spec.metric} {row[spec.metric]:.4f} (vs {fifo_best[spec.metric]:.4f} with all epochs)")
    # Determinism check: a configuration's epoch-1 metric should be equal in both runs.
    first = {}
    for label, hist in (("fifo", fifo_hist), ("asha", asha_hist)):
        e1 = hist[hist.epoch == 1]
        first[label] = sorted(round(float(v), 6) for v in e1[spec.metric])
    print(f"epoch-1 {spec.metric} identical across the runs (seeded training): {first['fifo'] == first['asha']}")
    per_trial = asha_out.trials.sort_values("epochs")[["trial_id", *keys, "epochs", "status", spec.metric]]
    print(per_trial.to_string(index=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("overhead")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--images", type=int, default=600)
    p = sub.add_parser("mlflow")
    p.add_argument("--results", type=int, nargs="+", default=[200, 2000])
    p = sub.add_parser("memory")
    p.add_argument("--images", type=int, nargs="+", default=[240, 1600])
    p.add_argument("--concurrent", type=int, nargs="+", default=[1, 2])
    p.add_argument("--epochs", type=int, default=2)
    p = sub.add_parser("asha")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--grace", type=int, default=1)
    p.add_argument("--reduction", type=float, default=2.0)
    args = parser.parse_args()
    {"overhead": bench_overhead, "mlflow": bench_mlflow, "memory": bench_memory, "asha": bench_asha}[args.what](args)


if __name__ == "__main__":
    main()
