"""Where a trial's time goes: the per-epoch timing fields of run_trial and `study profile`'s table."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from study import profiling
from study.config import TrialConfig
from study.data.tokens import normalize
from study.models import build_captioner
from study.spec import REPORTED
from study.trial.checkpoints import load_checkpoint
from study.trial.evaluation import FeatureSource, SplitTensors, validation_loss
from study.trial.training import run_trial

REPO = Path(__file__).resolve().parents[1]
TIMINGS = ("data_seconds", "val_loss_seconds", "decode_seconds", "metric_seconds")

torch.set_num_threads(1)


def test_run_trial_reports_where_the_epoch_went(small_shapes, small_prepared, tmp_path):
    cfg = TrialConfig(dataset=small_shapes, inject="init", hidden=48, embed=32, min_count=1, epochs=1,
                      batch_size=40, val_images=10)
    epoch = run_trial(cfg, small_prepared, work_dir=tmp_path, progress=False).epochs[0]
    assert set(TIMINGS) <= set(REPORTED)  # Tune and MLflow carry them
    for name in TIMINGS:
        assert epoch[name] >= 0.0, name
    assert epoch["data_seconds"] <= epoch["train_seconds"]  # data loading is part of the training pass
    parts = epoch["train_seconds"] + epoch["val_loss_seconds"] + epoch["decode_seconds"] + epoch["metric_seconds"]
    assert parts <= epoch["epoch_seconds"]
    assert epoch["decode_seconds"] > 0.0 and epoch["val_loss_seconds"] > 0.0


def test_val_captions_scores_the_first_captions_only(small_shapes, small_prepared, tmp_path):
    """val_captions: the val loss and bits per character of the first N captions (whole images first), the
    same numbers the full-split code gives on those captions."""
    cfg = TrialConfig(dataset=small_shapes, inject="init", hidden=48, embed=32, min_count=1, epochs=1,
                      batch_size=40, val_images=10, val_captions=23)
    result = run_trial(cfg, small_prepared, work_dir=tmp_path, progress=False)
    epoch = result.epochs[0]
    state = load_checkpoint(tmp_path / "checkpoint")
    tokens = small_prepared.tokens_for(cfg)
    model = build_captioner(cfg, len(tokens.vocab), small_prepared.feature_dim, small_prepared.feature_stats)
    model.load_state_dict(state["model"])
    features = FeatureSource(small_prepared, torch.device("cpu"), need_grid=False)
    val = small_prepared.images["val"]
    every = SplitTensors.of(tokens.splits["val"], val.rows)
    first = SplitTensors(every.ids[:23], every.lengths[:23], every.feature_rows[:23])
    # Under the precision the trial resolved (bf16 on a CPU with AVX512-BF16, as the trial validated).
    loss, nats = validation_loss(model, first, features, torch.device("cpu"), cfg.batch_size, result.precision)
    assert epoch["val_loss"] == pytest.approx(loss)
    chars = sum(len(normalize(c)) + 1 for c in [c for refs in val.references for c in refs][:23])
    assert epoch["val_bpc"] == pytest.approx(nats / math.log(2) / chars)
    assert len(every.lengths) > 23


# ----- the profile table on a synthetic study folder --------------------------------------------------
T0 = 1_800_000_000.0


def _result(trial_id: str, epoch: int, *, at: float, iter_s: float, since_restore: int, fine: bool) -> dict:
    row = {"epoch": epoch, "train_seconds": 8.0, "epoch_seconds": 10.0, "val_CIDEr-D": 0.1,
           "trial_id": trial_id, "timestamp": int(at), "time_this_iter_s": iter_s, "training_iteration": epoch,
           "iterations_since_restore": since_restore}
    if fine:
        row.update(data_seconds=1.0, val_loss_seconds=1.0, decode_seconds=0.5, metric_seconds=0.25)
    return row


def _write_study(folder: Path, *, fine: bool) -> Path:
    """Two slots (spec: 1 CPU per trial, max_concurrent 2). Trial a runs 4-42 s (3 epochs of 10 s + 2 s each,
    2 s of set-up), b 10-24 s (1 epoch), c 45-71 s (2 epochs), then trains on until the time budget ends the
    search at 80 s (Tune's last write of its state), which stops c without a result."""
    tune = folder / "tune"
    plan = {"a": (T0 + 4, [12, 12, 12]), "b": (T0 + 10, [12]), "c": (T0 + 45, [12, 12])}
    state = {"stats": {"start_time": T0}, "trial_data": []}
    for trial_id, (start, iters) in plan.items():
        (tune / f"m-{trial_id}").mkdir(parents=True)
        rows, at = [], start + 2  # 2 s of set-up before the first iteration
        for i, iter_s in enumerate(iters, 1):
            at += iter_s
            rows.append(_result(trial_id, i, at=at, iter_s=iter_s + (2 if i == 1 else 0), since_restore=i,
                                fine=fine))
        (tune / f"m-{trial_id}" / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        run = {"start_time": start, "last_result_time": at, "last_result": {"done": trial_id != "c"}}
        state["trial_data"].append([json.dumps({"trial_id": trial_id, "status": "TERMINATED"}), json.dumps(run)])
    _write_state(tune / "experiment_state-2027-01-15_08-00-00.json", state, written=T0 + 80)
    spec = yaml.safe_dump({"name": "synthetic", "resources": {"cpu": 1}, "search": {"max_concurrent": 2}})
    events = [{"kind": "study_start", "spec": spec}] + [{"kind": "trial_start", "trial": t} for t in plan]
    events += [{"kind": "trial_result", "trial": "a", "step": 1}]
    (folder / "tracking_journal.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return folder


def _write_state(path: Path, state: dict, *, written: float) -> None:
    """An experiment_state file last written (by its driver) at ``written``."""
    path.write_text(json.dumps(state))
    os.utime(path, (written, written))


@pytest.mark.parametrize("fine", [True, False])
def test_profile_table_splits_the_slot_time(tmp_path, fine):
    p = profiling.profile_study(_write_study(tmp_path, fine=fine), cpus=8, mlflow_costs={"*": 0.1})
    assert p.slots == 2 and p.epochs == 6 and p.fine is fine
    assert p.wall == pytest.approx(80.0)  # Tune's start to its last write
    rows = {label: seconds for label, seconds, _ in p.rows()}
    assert sum(share for _, _, share in p.rows()) == pytest.approx(100.0)
    assert sum(rows.values()) == pytest.approx(160.0)
    assert rows["epochs cut short or not reported yet (stopped, failed, running)"] == pytest.approx(80 - 71)
    if fine:  # 6 epochs x (8 - 1) s of steps, 1 s data, 1 s val loss, 0.5 s decoding, 0.25 s metrics
        assert rows["training steps (forward, backward, optimiser)"] == pytest.approx(42.0)
        assert rows["data loading (batch tokens + features)"] == pytest.approx(6.0)
        assert rows["metrics (CIDEr-D, BLEU-4 of the decoded captions)"] == pytest.approx(1.5)
        # the epoch's own 0.25 s of bookkeeping plus Tune's 2 s beyond each epoch
        assert rows["other per-epoch work (checkpoint, report)"] == pytest.approx(6 * 2.25)
    else:
        assert rows["training (steps and data loading)"] == pytest.approx(48.0)
        assert rows["validation (loss, decoding and metrics)"] == pytest.approx(12.0)
        assert any("predate the fine timing fields" in note for note in p.notes)
    # each trial's 2 s of set-up before its first iteration; MLflow: 4 events x 0.1 s, taken out of that
    assert rows["trial start/stop and Ray"] == pytest.approx(3 * 2.0 - 0.4)
    assert rows["MLflow tracking (estimated)"] == pytest.approx(0.4)
    busy = (3 * 12 + 2) + (12 + 2) + (2 * 12 + 2) + 9
    assert rows["idle slots"] == pytest.approx(160.0 - busy)
    assert "| idle slots |" in profiling.format_markdown(p)


def test_profile_of_a_resumed_study_counts_each_session_once(tmp_path):
    """A driver killed after trial a's epoch 2 (30 s into the search) and resumed 100 s after the first start:
    the resumed trial reports epoch 2 again (its set-up, 2.5 s, no model work), then trains epoch 3."""
    tune = tmp_path / "tune"
    (tune / "m-a").mkdir(parents=True)
    rows = [_result("a", 1, at=T0 + 18, iter_s=14, since_restore=1, fine=True),
            _result("a", 2, at=T0 + 30, iter_s=12, since_restore=2, fine=True),
            _result("a", 2, at=T0 + 106.5, iter_s=2.5, since_restore=1, fine=True),  # the restored epoch
            _result("a", 3, at=T0 + 118.5, iter_s=12, since_restore=2, fine=True)]
    (tune / "m-a" / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trial = [json.dumps({"trial_id": "a", "status": "RUNNING"}), json.dumps({"start_time": T0 + 4})]
    _write_state(tune / "experiment_state-2027-01-15_08-00-00.json",  # its last snapshot: 35 s, then killed
                 {"stats": {"start_time": T0}, "trial_data": [trial]}, written=T0 + 35)
    trial = [json.dumps({"trial_id": "a", "status": "TERMINATED"}),
             json.dumps({"start_time": T0 + 4, "last_result_time": T0 + 118.5, "last_result": {"done": True}})]
    _write_state(tune / "experiment_state-2027-01-15_08-01-40.json",
                 {"stats": {"start_time": T0 + 100}, "trial_data": [trial]}, written=T0 + 118.6)
    p = profiling.profile_study(tmp_path, slots=1, mlflow_costs={"*": 0.1})
    assert p.epochs == 3 and p.wall == pytest.approx(35 + 18.6)
    rows = {label: seconds for label, seconds, _ in p.rows()}
    assert rows["training steps (forward, backward, optimiser)"] == pytest.approx(3 * 7.0)
    assert rows["trial start/stop and Ray"] == pytest.approx(2.0 + 2.5)  # first set-up, then the restore
    # epoch 3 of the first driver, 5 s in when it was killed, is lost
    assert rows["epochs cut short or not reported yet (stopped, failed, running)"] == pytest.approx(5.0)
    assert rows["idle slots"] == pytest.approx(53.6 - (26 + 5 + 14.5))
    assert sum(share for _, _, share in p.rows()) == pytest.approx(100.0)


def test_study_profile_prints_the_table_of_a_study_folder(tmp_path):
    """`study profile STUDY` (issue 30 item 5: in the package, not a benchmark script) prints the same table."""
    from tests.helpers import study_in_process

    folder = _write_study(tmp_path, fine=True)
    done = study_in_process("profile", folder, "--cpus", "8", "--mlflow-ms", "100", "--markdown")
    assert done.exit_code == 0, done.output
    table = profiling.format_markdown(profiling.profile_study(folder, cpus=8, mlflow_costs={"*": 0.1}))
    assert table in done.output and "model work (training steps, val loss, decoding)" in done.output
    missing = study_in_process("profile", tmp_path / "nowhere")
    assert missing.exit_code != 0 and "nowhere" in " ".join(missing.output.split())
