"""A study on a nearly full disk (a real 30 MiB tmpfs, so the test needs root and skips without it): the driver
stops with one sentence naming the filesystem and the resume command, and once space is freed `study resume`
finishes the study from what was written whole (issue 22, item 1)."""

from __future__ import annotations

import json
import pickletools
import subprocess
from pathlib import Path

import pytest

from tests.helpers import study_command, study_spec


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_stops_the_study_in_one_sentence_and_resume_finishes_it(small_disk, tmp_path, small_shapes,
                                                                            small_prepared):
    spec_path = study_spec(tmp_path, "full", small_shapes, methods=["init", "none"], search={"trials": 4, "seed": 0},
                           asha={"max_epochs": 2, "grace_period": 2}, storage=str(small_disk / "runs"))
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (29 * 2**20))  # leave about 1 MiB: the study's first writes fill it

    stopped = study_command("run", str(spec_path), "--no-report", cwd=tmp_path)
    folder = small_disk / "runs" / "full"
    assert stopped.returncode == 2, stopped.stdout[-2000:] + stopped.stderr[-3000:]
    said = " ".join(stopped.stderr.split())
    assert f"no space left on the filesystem at {small_disk} (it holds {folder}" in said
    assert f"continue with: study resume {folder}" in said and "Traceback" not in stopped.stderr

    _every_state_file_is_whole(folder / "tune")  # the stop left the last snapshot as it was, not half-copied

    filler.unlink()
    resumed = study_command("resume", str(folder), "--no-report", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "search of study full finished" in resumed.stdout
    board = study_command("leaderboard", str(folder), "--all", "--format", "csv", cwd=tmp_path)
    assert board.returncode == 0, board.stderr[-2000:]
    rows = board.stdout.strip().splitlines()[1:]
    assert len(rows) == 4 and {row.split(",")[1] for row in rows} == {"init", "none"}
    _every_state_file_is_whole(folder / "tune")


def _every_state_file_is_whole(tune_folder: Path) -> None:
    """Tune's snapshot (JSON), the searchers' state (JSON) and Tune's search-generator state (a pickle, walked
    opcode by opcode with pickletools, which builds no object) all parse to their end."""
    states = sorted(tune_folder.glob("*state-*.json"))
    assert any(p.name.startswith("experiment_state-") for p in states), sorted(tune_folder.iterdir())
    for state in states:
        if state.name.startswith("search_gen_state-"):
            ops = list(pickletools.genops(state.read_bytes()))
            assert ops[-1][0].name == "STOP", state
        else:
            text = state.read_text()
            assert text.strip(), f"{state.name} is empty ({sorted(q.name for q in tune_folder.iterdir())})"
            json.loads(text)
    assert not list(tune_folder.glob(".*.upload-*")), "a partial upload was left behind"
