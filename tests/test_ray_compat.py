"""The workarounds of Ray's private behaviour (study/tuning/ray_compat.py): checked against the pinned Ray at
import, and still called by Tune's real controller (a real Tuner on a local Ray, not a hand-built one)."""

from __future__ import annotations

import json

import pytest

from study.tuning import ray_compat


def test_a_ray_of_another_version_or_a_changed_private_method_is_refused_loudly(monkeypatch):
    ray_compat.check_ray()  # the pinned Ray passes
    monkeypatch.setattr(ray_compat.ray, "__version__", "2.61.0")
    with pytest.raises(ImportError, match=r"needs Ray 2\.60\.0.*found 2\.61\.0"):
        ray_compat.check_ray()
    monkeypatch.setattr(ray_compat.ray, "__version__", ray_compat.RAY_VERSION)

    def set_trial_status(self, trial, status, reason):  # what a future Ray might change it to
        pass

    monkeypatch.setattr(ray_compat.TuneController, "_set_trial_status", set_trial_status)
    with pytest.raises(ImportError, match="_set_trial_status"):
        ray_compat.check_ray()


def _fails_once(config):
    """A trainable whose first attempt dies (a marker file tells the retry apart)."""
    from pathlib import Path

    from ray import tune

    marker = Path(config["marker"])
    if not marker.exists():
        marker.write_text("failed once")
        raise RuntimeError("first attempt fails")
    tune.report({"score": 1.0})


def test_tunes_real_controller_calls_the_patched_methods(tmp_path):
    from ray import tune

    ray_compat.install()
    ray_compat.install()  # idempotent: the methods are wrapped once
    before = dict(ray_compat.calls)
    ray_compat.ensure_ray(None)
    try:
        tuner = tune.Tuner(
            _fails_once, param_space={"marker": str(tmp_path / "marker")},
            run_config=tune.RunConfig(name="compat", storage_path=str(tmp_path), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=1)))
        results = tuner.fit()
    finally:
        ray_compat.shutdown()
    assert results[0].error is None and results[0].metrics["score"] == 1.0  # retried once, then finished
    failures = ray_compat.calls["process_trial_failure"] - before.get("process_trial_failure", 0)
    statuses = ray_compat.calls["set_trial_status"] - before.get("set_trial_status", 0)
    assert failures == 1  # the one failed attempt went through the patched failure handler
    assert statuses >= 3  # RUNNING, back to PENDING after the failure, RUNNING, TERMINATED
    assert ray_compat.calls["upload_to_fs_path"] > before.get("upload_to_fs_path", 0)  # snapshots go through it
    stored = sorted(p.name for p in (tmp_path / "compat").iterdir() if p.is_file())
    assert any(name.startswith("experiment_state-") for name in stored) and "tuner.pkl" in stored
    assert not [name for name in stored if ".upload-" in name]  # each file renamed into place once whole
    # Tune's snapshot is written beside itself and renamed (the upload thread never copies it half-written),
    # and the stored one is the state Tune saved: the finished trial, read back with Tune's own decoder.
    assert ray_compat.calls["save_to_dir"] > before.get("save_to_dir", 0)
    assert not [name for name in stored if name.startswith(".") and name != ".validate_storage_marker"]
    state = json.loads((tmp_path / "compat" / next(n for n in stored if n.startswith("experiment_state-")))
                       .read_text())
    assert len(state["trial_data"]) == 1 and "runner_data" in state and "start_time" in state["stats"]
