"""The helpers the test modules share, in one module (import them: `from tests.helpers import study_spec, wait_for`;
no test module imports another): the spec builders, the `study` command run in a subprocess, in process or as a
background driver (and its kill), polling for a condition, reading a study's journal, a process group's members,
a small valid spec and a crafted pickle for the fault tests, a synthetic captioning task for the models and
synthetic study frames for the analysis. Fixtures stay in conftest.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
FLICKR = REPO.parent / "shared" / "data" / "flickr8k-1k"


def study_command(*args: object, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m study ARGS...` as a subprocess, as a user runs it (its own logging and console), text output."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "study", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def study_in_process(*args: object, columns: int | None = None):
    """`study ARGS...` in process (typer's CliRunner): exit_code, stdout, stderr and output (both); ``columns``
    sets the console's width (rich wraps at 80 without one)."""
    from typer.testing import CliRunner

    from study.cli.app import app

    env = {"COLUMNS": str(columns)} if columns else None
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def wait_for(predicate, timeout: float, what: str, *, process: subprocess.Popen | None = None,
             interval: float = 0.2):
    """Poll `predicate` until it returns something true, and return that. Fail the test naming `what` when
    `timeout` seconds pass first, or when `process` (the one expected to bring it about, and to be still running
    once it has) ends, with the end of its output."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            output = process.stdout.read() if process.stdout is not None else ""
            if isinstance(output, bytes):
                output = output.decode(errors="replace")
            raise AssertionError(f"the process ended (exit {process.returncode}) before {what}:\n{output[-3000:]}")
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:g} s")
        time.sleep(interval)


def journal_events(folder: Path) -> list[dict]:
    """The events of a study's `tracking_journal.jsonl` so far (a line still being appended is left out)."""
    journal = folder / "tracking_journal.jsonl"
    if not journal.exists():
        return []
    text = journal.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def process_group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group."""
    members = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            text = (proc / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(proc.name))
    return members


def shapes_dataset(shapes) -> dict:
    """The spec's `dataset` block for a `ShapesDataset` config (as the `small_shapes` fixture gives)."""
    return {"kind": "shapes", "images": shapes.images, "image_size": shapes.image_size, "seed": shapes.seed,
            "cache_dir": str(shapes.cache_dir)}


def study_spec(folder: Path, name: str, dataset, *, methods=("init", "merge"), lr=(3e-3, 1e-2), **overrides) -> Path:
    """Write `<folder>/<name>.yaml`, a small real study searching `methods` (`inject`) and `lr`, stored in
    `<folder>/runs`, and return its path. `dataset` is a `ShapesDataset` config or the spec's `dataset` block.
    Each override replaces a top-level key whole; one given as None leaves the key out of the spec."""
    spec = {
        "name": name,
        "dataset": dataset if isinstance(dataset, dict) else shapes_dataset(dataset),
        "fixed": {"cell": "lstm", "hidden": 48, "embed": 32, "min_count": 1, "batch_size": 40, "val_images": 20},
        "space": {"inject": {"choice": list(methods)}, "lr": {"loguniform": list(lr)}},
        "stratify": "inject",
        "search": {"trials": 2 * len(methods), "seed": 1},
        "asha": {"max_epochs": 3, "grace_period": 3, "reduction_factor": 2},
        "resources": {"cpu": 1},
        "storage": str(folder / "runs"),
        "max_failures": 1,
        "confirm": {"top_k": 1, "seeds": 2, "epochs": 2, "beam_size": 2, "margin_points": 5},
    }
    spec.update(overrides)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({key: value for key, value in spec.items() if value is not None}))
    return path


# ----- a driver in the background, and its kill -----------------------------------------------------------------
def small_study_spec(tmp_path: Path, shapes, name: str, **overrides) -> Path:
    """``study_spec`` with a smaller model (hidden 16), 6 trials and a 1-seed, 1-epoch, greedy confirm stage."""
    settings = {
        "fixed": {"cell": "lstm", "hidden": 16, "embed": 16, "min_count": 1, "batch_size": 40, "val_images": 20},
        "search": {"trials": 6, "seed": 1},
        "confirm": {"top_k": 1, "seeds": 1, "epochs": 1, "beam_size": 1, "margin": 0.05},
    }
    return study_spec(tmp_path, name, shapes, **{**settings, **overrides})


def start_driver(args: list[str], cwd: Path) -> subprocess.Popen:
    """`python -m study ARGS...` started in the background, its output unbuffered on one pipe."""
    # Its own session, as from a shell: the driver leads the process group its Ray joins.
    return subprocess.Popen([sys.executable, "-m", "study", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=cwd)


def kill_driver_only(driver: subprocess.Popen) -> None:
    import signal

    os.kill(driver.pid, signal.SIGKILL)  # kill -9 of the driver: the Ray it started is left running
    driver.wait(timeout=60)


# ----- specs and files the fault tests use -----------------------------------------------------------------------
# A small valid spec: init and attention, a conditional parameter (attention_dim only where inject is attention).
GOOD_SPEC = """
name: t
dataset: {kind: shapes, images: 60}
fixed: {cell: lstm}
space:
  inject: {choice: [init, attention]}
  lr: {loguniform: [1.0e-3, 1.0e-2]}
  attention_dim: {choice: [32, 64], when: {inject: attention}}
stratify: inject
search: {trials: 4}
asha: {max_epochs: 3, grace_period: 1}
"""


class PickleExploit:
    """Unpickling this runs a shell command that leaves a marker file: what a crafted state file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


# ----- a synthetic captioning task for the models: known answers, no data -----------------------------------------
FEAT, GRID, CLASSES, WORDS, VOCAB = 16, 4, 8, 5, 24


def tiny_cfg(cell: str, inject: str, **kw):
    """A small model's TrialConfig (hidden 32, no dropout, one layer) for ``cell`` and ``inject``."""
    from study.config import TrialConfig

    base = dict(cell=cell, inject=inject, hidden=32, embed=16, attention_dim=16, dropout=0.0, layers=1)
    return TrialConfig(**(base | kw))


def synthetic_task(images: int = 32, seed: int = 0):
    """Each image shows one of CLASSES prototypes in a random grid cell; its caption is that class's fixed
    random word sequence. Without the image the best achievable loss is ln(CLASSES) / (WORDS + 1) per token."""
    import torch

    from study.data.tokens import END, START

    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(CLASSES, FEAT, generator=g) * 2
    sentences = torch.randint(4, VOCAB, (CLASSES, WORDS), generator=g)
    cls = torch.arange(images) % CLASSES
    grid = torch.randn(images, GRID, FEAT, generator=g) * 0.3
    where = torch.randint(0, GRID, (images,), generator=g)
    grid[torch.arange(images), where] += protos[cls]
    pooled = grid.mean(dim=1)
    words = sentences[cls]  # (N, WORDS)
    start = torch.full((images, 1), START)
    end = torch.full((images, 1), END)
    tokens_in, targets = torch.cat([start, words], 1), torch.cat([words, end], 1)  # (N, WORDS + 1)
    # Features come from the cache as float16.
    return pooled.half(), grid.half(), tokens_in, targets


# ----- synthetic study frames for the analysis: known answers, no training (scores on the 0..1 scale) ------------
def per_image_frame(true: dict[str, float], *, images: int, seeds: int, noise: float, seed_sd: float = 0.005,
                    seed: int = 0) -> pd.DataFrame:
    """Per-image scores: method mean x shared image difficulty + per-seed offset + per-image noise."""
    rng = np.random.default_rng(seed)
    difficulty = rng.gamma(4.0, 0.25, images)  # mean 1; shared by all methods, as real image difficulty is
    frames = []
    for method, mu in true.items():
        for s in range(seeds):
            v = mu * difficulty + rng.normal(0, seed_sd) + rng.normal(0, noise, images)
            frames.append(pd.DataFrame({"method": method, "config_rank": 1, "seed": s,
                                        "image_id": np.arange(images), "CIDEr-D": v, "BLEU-4": v / 3,
                                        "METEOR": np.nan, "ROUGE-L": v / 2}))
    return pd.concat(frames, ignore_index=True)


def runs_frame(per_image: pd.DataFrame) -> pd.DataFrame:
    runs = per_image.groupby(["method", "config_rank", "seed"], as_index=False)[["CIDEr-D", "BLEU-4"]].mean()
    return runs.assign(params=runs["method"].map(lambda m: 2e6 if m == "attention" else 1e6),
                       train_seconds=120.0, epochs=10)


EQUAL = {"init": 0.50, "pre": 0.49, "par": 0.48, "merge": 0.47, "attention": 0.505, "none": 0.20}


SPACE = {
    "inject": {"type": "choice", "values": ["init", "pre", "par", "merge", "attention", "none"]},
    "cell": {"type": "choice", "values": ["lstm", "gru", "lstm_peephole"]},
    "tokens": {"type": "choice", "values": ["word", "char"]},
    "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
    "dropout": {"type": "uniform", "low": 0.0, "high": 0.5},
    "hidden": {"type": "quniform", "low": 128, "high": 1024, "step": 128},
}


def trials_frame(n: int = 30, seed: int = 0) -> pd.DataFrame:
    """Trials whose val_CIDEr-D is driven by dropout alone (peaks in the middle of its range)."""
    rng = np.random.default_rng(seed)
    t = pd.DataFrame({
        "trial_id": [f"t{i:02d}" for i in range(n)], "inject": rng.choice(SPACE["inject"]["values"], n),
        "cell": rng.choice(SPACE["cell"]["values"], n), "tokens": rng.choice(["word", "char"], n),
        "lr": np.exp(rng.uniform(np.log(1e-4), np.log(1e-2), n)), "dropout": rng.uniform(0, 0.5, n),
        "hidden": rng.choice(np.arange(128, 1025, 128), n).astype(float),
        "status": rng.choice(["completed", "stopped"], n, p=[0.4, 0.6]), "epochs": rng.integers(2, 8, n),
        "train_seconds": 60.0, "params": 1e6,
    })
    t["val_CIDEr-D"] = 0.5 - 4 * (t["dropout"] - 0.25) ** 2 + rng.normal(0, 0.005, n)
    t.loc[0, "status"] = "errored"
    t.loc[0, "val_CIDEr-D"] = np.nan
    return t


def history_frame(trials: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, t in trials.iterrows():
        for epoch in range(1, int(t["epochs"]) + 1):
            rows.append({"trial_id": t["trial_id"], "inject": t["inject"], "epoch": epoch,
                         "val_CIDEr-D": (t["val_CIDEr-D"] if pd.notna(t["val_CIDEr-D"]) else 0.1) * epoch / 8,
                         "val_loss": 3 - epoch * 0.1, "train_loss": 3 - epoch * 0.15})
    return pd.DataFrame(rows)
