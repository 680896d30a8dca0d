"""The shared training loop on real (small) shapes data: learning, checkpoints, resume, divergence, CLI."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from study.config import TrialConfig
from study.trial import checkpoints
from study.trial.checkpoints import copy_checkpoint, load_checkpoint
from study.trial.evaluation import Decoding, score_split
from study.trial.training import TrialDiverged, length_bucketed_batches, run_trial

torch.set_num_threads(1)


def _cfg(dataset, **kw) -> TrialConfig:
    base = dict(dataset=dataset, inject="init", cell="lstm", hidden=96, embed=48, dropout=0.0, tokens="word",
                min_count=1, epochs=2, batch_size=40, lr=5e-3, val_images=20)
    return TrialConfig.model_validate({**base, **kw})


def test_bucketed_batches_cover_every_caption_once_and_bucket_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 30, size=1000)
    batches = length_bucketed_batches(lengths, 32, np.random.default_rng(1), bucket_batches=8)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(1000))
    # Within a batch lengths are close: mean spread far below a random batch's spread.
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    assert spread < 8, spread


def test_trial_learns_writes_checkpoints_and_resumes_exactly(small_shapes, small_prepared, tmp_path):
    cfg = _cfg(small_shapes, epochs=3)
    saved: dict[int, Path] = {}

    def report(metrics, checkpoint_dir):
        # Keep a copy of each epoch's checkpoint, as Tune persists them.
        saved[metrics["epoch"]] = Path(shutil.copytree(checkpoint_dir, tmp_path / f"epoch{metrics['epoch']}"))

    full = run_trial(cfg, small_prepared, work_dir=tmp_path / "a", on_epoch=report, progress=False)
    losses = [e["train_loss"] for e in full.epochs]
    assert len(losses) == 3 and losses[-1] < 0.75 * losses[0], losses
    for key in ("val_loss", "val_bpc", "val_CIDEr-D", "val_BLEU-4", "tokens_per_second"):
        assert np.isfinite(full.epochs[-1][key]), key
    assert full.epochs[-1]["val_bpc"] > 0

    state = load_checkpoint(saved[1])  # weights_only=True inside
    assert state["epoch"] == 1 and state["config"]["inject"] == "init" and "itos" in json.dumps(state["vocab"])

    resumed = run_trial(cfg, small_prepared, work_dir=tmp_path / "b", resume_from=saved[1], progress=False)
    assert [e["epoch"] for e in resumed.epochs] == [1, 2, 3]
    for a, b in zip(full.epochs[1:], resumed.epochs[1:]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


def test_char_and_word_models_report_comparable_bits_per_character(small_shapes, small_prepared, tmp_path):
    word = run_trial(_cfg(small_shapes, epochs=1), small_prepared, work_dir=tmp_path / "w", progress=False)
    char = run_trial(_cfg(small_shapes, epochs=1, tokens="char", max_len=100), small_prepared,
                     work_dir=tmp_path / "c", progress=False)
    # Both in bits per character of the same captions: same order of magnitude, below log2(vocab).
    for result in (word, char):
        assert 0.05 < result.epochs[0]["val_bpc"] < 6


def test_real_image_features_beat_shuffled_ones(small_shapes, small_prepared, tmp_path):
    cfg = _cfg(small_shapes, epochs=8, hidden=128, lr=8e-3, val_images=None)
    work = tmp_path / "img"
    result = run_trial(cfg, small_prepared, work_dir=work, progress=False)
    model = result.model  # the trained model itself: what the confirm stage scores
    vocab, greedy = small_prepared.tokens_for(cfg).vocab, Decoding.of(cfg, beam_size=1)
    real = score_split(model, small_prepared, "val", vocab=vocab, decoding=greedy).scores
    shuffled_data = dataclasses.replace(small_prepared, images=dict(small_prepared.images))
    val = small_prepared.images["val"]
    shuffled_data.images["val"] = dataclasses.replace(val, rows=np.roll(val.rows, 7))
    shuffled = score_split(model, shuffled_data, "val", vocab=vocab, decoding=greedy).scores
    assert real["CIDEr-D"] > 1.5 * shuffled["CIDEr-D"] + 0.05, (real, shuffled)

    # The checkpoint it wrote captions exactly as the model run_trial returned it.
    from study.trial.inference import load_captioner

    reloaded, _, _ = load_captioner(work / "checkpoint", torch.device("cpu"))
    beam = Decoding.of(cfg, beam_size=2)
    again = score_split(reloaded, small_prepared, "val", vocab=vocab, decoding=beam, per_image=True)
    direct = score_split(model, small_prepared, "val", vocab=vocab, decoding=beam, per_image=True)
    assert again.captions == direct.captions and again.per_image == direct.per_image


def test_nan_features_make_the_trial_fail_with_a_reason(small_shapes, small_prepared, tmp_path):
    poisoned = dataclasses.replace(small_prepared, pooled=np.full_like(small_prepared.pooled, np.inf))
    with pytest.raises(TrialDiverged, match=r"epoch 1.*init-lstm"):
        run_trial(_cfg(small_shapes, epochs=1), poisoned, work_dir=tmp_path, progress=False)


def test_copy_checkpoint_killed_mid_copy_keeps_the_previous_one(tmp_path, monkeypatch):
    """`study train` copies each epoch's checkpoint into the run folder: a copy cut short leaves the previous
    epoch's file whole (the copy goes to a temporary name that replaces it only when complete), and no debris."""
    work, out = tmp_path / "run" / ".work", tmp_path / "run"
    (work / "checkpoint").mkdir(parents=True)
    (work / "checkpoint" / "checkpoint.pt").write_bytes(b"epoch 1" * 1000)
    assert copy_checkpoint(work, out) == out / "checkpoint.pt"
    assert (out / "checkpoint.pt").read_bytes() == b"epoch 1" * 1000

    (work / "checkpoint" / "checkpoint.pt").write_bytes(b"epoch 2" * 1000)

    def killed(src, dst):
        Path(dst).write_bytes(Path(src).read_bytes()[:100])  # half a file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.shutil, "copyfile", killed)
    with pytest.raises(KeyboardInterrupt):
        copy_checkpoint(work, out)
    assert (out / "checkpoint.pt").read_bytes() == b"epoch 1" * 1000
    assert sorted(p.name for p in out.iterdir()) == [".work", "checkpoint.pt"]

    monkeypatch.undo()
    copy_checkpoint(work, out)
    assert (out / "checkpoint.pt").read_bytes() == b"epoch 2" * 1000


@pytest.mark.slow
def test_study_train_cli_writes_metrics_and_checkpoint_and_captions(small_shapes, tmp_path):
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump({
        "dataset": {"kind": "shapes", "images": small_shapes.images, "image_size": small_shapes.image_size,
                    "seed": small_shapes.seed, "cache_dir": str(small_shapes.cache_dir)},
        "cell": "gru", "layers": 2, "hidden": 64, "embed": 32, "tokens": "word", "inject": "merge", "epochs": 2,
        "min_count": 1, "batch_size": 40,
    }))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "study", "train", str(config), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    final = metrics["final"]
    for key in ("BLEU-1", "BLEU-4", "CIDEr-D", "ROUGE-L", "METEOR"):
        assert key in final
    assert 0 <= final["CIDEr-D"] < 10 and final["BLEU-1"] > 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["config"]["cell"] == "gru" and state["epoch"] == 2

    images = sorted((Path(small_shapes.cache_dir)).rglob("images/*.png"))[:2]
    proc = subprocess.run([sys.executable, "-m", "study", "caption", "--checkpoint", str(out / "checkpoint.pt"),
                           *map(str, images)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and all(len(line.split("\t")[1].split()) >= 2 for line in lines)


def test_bad_trial_yaml_names_the_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("inject: init\ncel: lstm\nlayers: 9\n")
    proc = subprocess.run([sys.executable, "-m", "study", "train", str(config)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "cel: unknown key" in proc.stderr and "layers" in proc.stderr and str(config) in proc.stderr


def test_a_min_count_that_leaves_no_word_is_refused_naming_the_count_it_needs(small_shapes):
    """min_count 100000 on shapes used to leave only the special tokens: training "succeeded", every score 0."""
    from study.config import ConfigError
    from study.data.prepare import TokenSetting, prepare

    with pytest.raises(ConfigError, match=r"min_count 100000: no word of the train split occurs that often.*"
                                          r"the most frequent word occurs (\d+) times: use min_count \1 or less"):
        prepare(small_shapes, [TokenSetting("word", 20, 100000)], progress=False)
