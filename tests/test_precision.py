"""The precision setting: what ``auto`` resolves to, bf16 training against fp32 on real shapes data, and where
the resolved precision is recorded."""

from __future__ import annotations

import json

import pytest
import torch

from study.config import ConfigError, TrialConfig
from study.spec import load_spec
from study.trial.checkpoints import load_checkpoint
from study.trial.precision import cpu_has_bf16, resolve
from study.trial.training import run_trial, write_metrics

torch.set_num_threads(1)


def test_auto_is_bf16_on_cuda_and_on_a_cpu_with_bf16_units_else_fp32(monkeypatch):
    assert resolve("auto", "cuda") == "bf16"
    assert resolve("fp32", "cuda") == "fp32" and resolve("bf16", "cpu") == "bf16"
    assert resolve("auto", "cpu") == ("bf16" if cpu_has_bf16() else "fp32")
    # A CPU without AVX512-BF16 or AMX (torch's own probes say no): bf16 would be emulated, slower than fp32.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not cpu_has_bf16() and resolve("auto", "cpu") == "fp32"
    with pytest.raises(ValueError, match="valid: auto, fp32, bf16"):
        resolve("fp16", "cpu")


def test_precision_is_one_setting_per_study_not_a_searched_parameter(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\nspace:\n  inject: {choice: [init, par]}\n  precision: {choice: [fp32, bf16]}\n")
    with pytest.raises(ConfigError, match="precision is one setting for the whole study"):
        load_spec(spec)


@pytest.mark.parametrize("inject,cell", [("init", "lstm"), ("attention", "gru")])
def test_bf16_training_reaches_the_fp32_loss_and_records_its_precision(inject, cell, small_shapes, small_prepared,
                                                                       tmp_path):
    """Same seed, same data, 4 epochs: bf16's final validation loss is within 3% of fp32's (measured here:
    well under 1%), and both learn (the loss falls by a quarter). The precision that ran is in the result,
    metrics.json and the checkpoint's config."""
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = TrialConfig(dataset=small_shapes, inject=inject, cell=cell, hidden=96, embed=48, attention_dim=32,
                          min_count=1, epochs=4, batch_size=40, lr=5e-3, val_images=20, seed=7, precision=precision)
        result = run_trial(cfg, small_prepared, work_dir=tmp_path / precision, progress=False)
        epochs = result.epochs
        assert epochs[-1]["val_loss"] < 0.75 * epochs[0]["train_loss"], epochs
        losses[precision] = epochs[-1]["val_loss"]
        assert result.precision == precision and result.record["config"]["precision"] == precision
        saved = json.loads(write_metrics(result, tmp_path / precision).read_text())
        assert saved["precision"] == precision
        assert load_checkpoint(tmp_path / precision / "checkpoint")["config"]["precision"] == precision
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.03), losses


def test_auto_is_recorded_as_what_it_resolved_to(small_shapes, small_prepared, tmp_path):
    cfg = TrialConfig(dataset=small_shapes, hidden=32, embed=16, min_count=1, epochs=1, val_images=5)
    assert cfg.precision == "auto"
    result = run_trial(cfg, small_prepared, work_dir=tmp_path, progress=False)
    assert result.precision == resolve("auto", "cpu")
    assert load_checkpoint(tmp_path / "checkpoint")["config"]["precision"] == resolve("auto", "cpu")
