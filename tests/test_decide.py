"""`study decide` end to end on a real (tiny) study: an inconclusive verdict gets one more seed per compared
method at each look, every look is recorded with the plan's level, and the report says what it took."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def _study(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "study", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_decide_adds_seeds_under_the_plan_and_the_report_says_so(tmp_path, small_shapes):
    # Two barely trained methods write captions that score 0 on every test image, so init - pre is exactly 0
    # with no spread; with margin 0 the interval [0, 0] neither clears nor falls below it: inconclusive at
    # every look, and decide must stop at max_seeds.
    spec_path = tmp_path / "decide.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "decide",
        "dataset": {"kind": "shapes", "images": small_shapes.images, "image_size": small_shapes.image_size,
                    "seed": small_shapes.seed, "cache_dir": str(small_shapes.cache_dir)},
        "fixed": {"hidden": 8, "embed": 8, "min_count": 1, "batch_size": 160, "lr": 1e-6, "max_len": 4,
                  "val_images": 5},
        "space": {"inject": {"choice": ["init", "pre"]}},
        "stratify": "inject",
        "search": {"trials": 2, "seed": 0},
        "asha": {"max_epochs": 1, "grace_period": 1},
        "storage": str(tmp_path / "runs"),
        "confirm": {"seeds": 1, "epochs": 1, "beam_size": 1, "margin": 0.0, "max_seeds": 2},
    }))
    run = _study("run", str(spec_path), "--no-report", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    too_many = _study("decide", "decide", "--storage", str(tmp_path / "runs"), "--max-seeds", "5", cwd=tmp_path)
    assert too_many.returncode == 2 and "raising it to 5 now would void its error bound" in too_many.stderr

    decided = _study("decide", "decide", "--storage", str(tmp_path / "runs"), cwd=tmp_path)
    assert decided.returncode == 0, decided.stderr[-3000:]
    folder = tmp_path / "runs" / "decide"
    record = json.loads((folder / "decide.json").read_text())
    assert [look["seeds"] for look in record["looks"]] == [{"init": 1, "pre": 1}, {"init": 2, "pre": 2}]
    assert all(look["level"] == pytest.approx(1 - 0.05 / 2) for look in record["looks"])
    assert all(look["verdict"].startswith("inconclusive") for look in record["looks"])
    assert sorted(p.name for p in (folder / "confirm").glob("*.json")) == [
        "init-r1-s0.json", "init-r1-s1.json", "pre-r1-s0.json", "pre-r1-s1.json"]
    report = (folder / "report" / "report.md").read_text()
    assert "[97.5% CI]" in report
    assert "Not decided after 2 seeds per method, the plan's limit" in report
