"""Shared fixtures: a small `shapes` dataset prepared once per test session (real generator, real CNN); and the
helpers the study tests share: one spec builder, polling for a condition, reading a study's journal."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FLICKR = REPO.parent / "shared" / "data" / "flickr8k-1k"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def feature_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def small_shapes(feature_cache_dir):
    """A 200-image shapes dataset config (160 train / 20 val / 20 test) cached for the session."""
    from study.config import ShapesDataset

    return ShapesDataset(images=200, image_size=64, seed=3, cache_dir=feature_cache_dir)


@pytest.fixture(scope="session")
def small_prepared(small_shapes):
    """The small shapes dataset read, featurised (pooled + grid) and tokenised (word and char)."""
    from study.data.prepare import TokenSetting, prepare

    return prepare(small_shapes, [TokenSetting("word", 20, 1), TokenSetting("char", 100, 1)], progress=False)


@pytest.fixture(scope="session")
def flickr_dir() -> Path:
    if not (FLICKR / "dataset_flickr8k.json").is_file():
        pytest.skip(f"real data not found at {FLICKR}")
    return FLICKR


# ----- helpers shared by the test modules (import them: `from tests.conftest import study_spec, wait_for`) ----------
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
        "confirm": {"top_k": 1, "seeds": 2, "epochs": 2, "beam_size": 2, "margin": 0.05},
    }
    spec.update(overrides)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({key: value for key, value in spec.items() if value is not None}))
    return path
