"""The helpers the test modules share (import them: `from tests.helpers import study_spec, wait_for`): one spec
builder, the `study` command run in a subprocess or in process, polling for a condition, reading a study's journal,
a process group's members. Fixtures stay in conftest.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

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
