"""Attention at full strength (Xu et al. 2015): the initial state from the mean annotation vector
(``attention_init``) and the doubly stochastic penalty (``attention_penalty``): learning, gradients, the penalty's
value, and defaults that leave every existing attention model exactly as it was."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from study.config import TrialConfig
from study.data.tokens import PAD
from study.models import build_captioner
from study.models.inject import doubly_stochastic_penalty
from study.registry import CELLS
from tests.helpers import CLASSES, FEAT, GOOD_SPEC, VOCAB, WORDS, synthetic_task, tiny_cfg

torch.set_num_threads(1)


def penalised_loss(model, pooled, grid, tokens_in, targets, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the training's loss: mean NLL + lam * penalty / tokens, as study.trial.training adds it; the plain mean NLL)."""
    logits, alpha = model.forward_attended(pooled, grid, tokens_in)  # (B, T, V), (B, T, G)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PAD,
                          reduction="sum")
    n = int((targets != PAD).sum())
    return (nll + lam * doubly_stochastic_penalty(alpha, targets)) / n, nll.detach() / n


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_full_strength_attention_learns_the_image_dependent_task(cell: str) -> None:
    """As test_models' every-combination test, with the learned initial state and the penalty in the loss."""
    torch.manual_seed(0)
    pooled, grid, tokens_in, targets = synthetic_task()
    model = build_captioner(tiny_cfg(cell, "attention", attention_init=True), VOCAB, FEAT)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    _, initial = penalised_loss(model, pooled, grid, tokens_in, targets, 0.5)
    assert initial.item() == pytest.approx(math.log(VOCAB), rel=0.15)
    for _ in range(120):
        opt.zero_grad()
        loss, _ = penalised_loss(model, pooled, grid, tokens_in, targets, 0.5)
        loss.backward()
        opt.step()
    _, final = penalised_loss(model, pooled, grid, tokens_in, targets, 0.5)
    assert final.item() < 0.5 * math.log(CLASSES) / (WORDS + 1)  # well below the no-image entropy bound
    model.eval()
    decoded = model.greedy(pooled, grid, max_len=WORDS + 3)
    correct = (decoded[:, : WORDS + 1] == targets).all(dim=1) & (decoded[:, WORDS + 1 :] == PAD).all(dim=1)
    assert correct.float().mean().item() >= 0.9


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_initial_state_is_tanh_of_the_mean_annotation_for_every_layer(cell: str) -> None:
    torch.manual_seed(0)
    model = build_captioner(tiny_cfg(cell, "attention", layers=2, attention_init=True), VOCAB, FEAT)
    model = model.double().eval()
    pooled, grid, _, _ = synthetic_task(images=3)
    ctx = model.encode(pooled, grid)
    h, c = model.start_state(ctx, 3)  # (L, B, H) each
    inj, mean = model.injection, ctx["grid"].mean(dim=1)  # (B, F)
    expect_h = torch.tanh(mean @ inj.init_h.weight.T + inj.init_h.bias).view(3, 2, 32).transpose(0, 1)
    torch.testing.assert_close(h, expect_h)
    assert torch.count_nonzero(h[1]) > 0  # the second layer is seeded too
    if cell == "gru":
        assert c is None and inj.init_c is None
    else:
        expect_c = torch.tanh(mean @ inj.init_c.weight.T + inj.init_c.bias).view(3, 2, 32).transpose(0, 1)
        torch.testing.assert_close(c, expect_c)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_full_strength_under_bf16_autocast_stays_near_fp32(cell: str) -> None:
    """The initial state and the penalty under bf16 autocast (the weights stay fp32, the state in the weights'
    dtype): NLL and penalty within 1% of fp32's on an untrained 2-layer model, and beam search runs."""
    from study.trial.precision import autocast

    torch.manual_seed(0)
    model = build_captioner(tiny_cfg(cell, "attention", hidden=64, layers=2, attention_init=True), VOCAB, FEAT)
    model.eval()
    pooled, grid, tokens_in, targets = synthetic_task(images=16)
    values = []
    for precision in ("fp32", "bf16"):
        with torch.no_grad(), autocast(torch.device("cpu"), precision):
            logits, alpha = model.forward_attended(pooled, grid, tokens_in)
            assert model.beam_search(pooled, grid, 3, 8).shape == (16, 8)
        assert alpha.dtype == torch.float32
        nll = F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1))
        values.append((float(nll), float(doubly_stochastic_penalty(alpha, targets))))
    assert values[1] == pytest.approx(values[0], rel=0.01)


def test_penalty_equals_a_hand_computation() -> None:
    # Two captions, three steps, two grid cells; the second caption's last target is PAD (its weights ignored).
    alpha = torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]],
                          [[0.3, 0.7], [0.6, 0.4], [0.99, 0.01]]], dtype=torch.float64)
    targets = torch.tensor([[5, 6, 3], [5, 3, PAD]])
    # caption 1: sums over t (1.6, 1.4) -> (1 - 1.6)^2 + (1 - 1.4)^2 = 0.36 + 0.16 = 0.52
    # caption 2: real steps 0 and 1 only: sums (0.9, 1.1) -> 0.01 + 0.01 = 0.02
    assert doubly_stochastic_penalty(alpha, targets).item() == pytest.approx(0.54, abs=1e-12)


@pytest.mark.parametrize("cell", ["gru", "lstm", "lstm_peephole"])
def test_gradients_through_the_init_layers_and_the_penalty(cell: str) -> None:
    """torch.autograd.gradcheck (float64) of NLL + lambda * penalty with respect to the grid, the attention's
    weights and the new init layers (of a 2-layer stack)."""
    torch.manual_seed(0)
    feat, grid_cells, vocab = 5, 3, 7
    cfg = TrialConfig(cell=cell, inject="attention", hidden=8, embed=8, attention_dim=8, dropout=0.0, layers=2,
                      attention_init=True, attention_penalty=0.7)
    model = build_captioner(cfg, vocab, feat).double().eval()
    pooled = torch.randn(2, feat, dtype=torch.float64)
    grid = torch.randn(2, grid_cells, feat, dtype=torch.float64, requires_grad=True)
    tokens_in = torch.tensor([[1, 4, 5], [1, 6, 4]])
    targets = torch.tensor([[4, 5, 2], [6, 2, PAD]])
    names = [n for n, _ in model.named_parameters() if n.startswith("injection.")]
    assert {"injection.init_h.weight", "injection.init_h.bias"} <= set(names)
    assert ("injection.init_c.weight" in names) == (cell != "gru")
    params = [model.get_parameter(n).detach().clone().requires_grad_(True) for n in names]
    attended = Attended(model)

    def loss(grid, *weights):
        swapped = {f"model.{n}": w for n, w in zip(names, weights)}
        logits, alpha = torch.func.functional_call(attended, swapped, (pooled, grid, tokens_in))
        nll = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), ignore_index=PAD, reduction="sum")
        return nll + cfg.attention_penalty * doubly_stochastic_penalty(alpha, targets)

    assert torch.autograd.gradcheck(loss, (grid, *params))


class Attended(torch.nn.Module):
    """``model.forward_attended`` as a module's ``forward``, for ``torch.func.functional_call``."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, pooled, grid, tokens_in):
        return self.model.forward_attended(pooled, grid, tokens_in)


# Computed with the code before attention_init / attention_penalty existed (torch.manual_seed(7), the model below):
# the sum of every parameter and of the logits. Same seed, same draws, same numbers.
BEFORE = {"gru": (-48.753147620174786, -16.577560772258693),
          "lstm": (62.855482397373635, -11.092466768293948),
          "lstm_peephole": (55.69226768696353, 4.979856536003108)}


@pytest.mark.parametrize("cell", sorted(BEFORE))
def test_defaults_leave_attention_as_it_was(cell: str) -> None:
    torch.manual_seed(7)
    cfg = tiny_cfg(cell, "attention", layers=2)
    assert not cfg.attention_init and cfg.attention_penalty == 0.0
    model = build_captioner(cfg, VOCAB, FEAT).double().eval()
    assert not any("init_" in name for name, _ in model.named_parameters())  # no new tensor, no new draw
    pooled, grid, tokens_in, _ = synthetic_task(images=3, seed=5)
    with torch.no_grad():
        logits = model(pooled, grid, tokens_in)
        again, alpha = model.forward_attended(pooled, grid, tokens_in)
        h, c = model.start_state(model.encode(pooled, grid), 3)
    params, total = BEFORE[cell]
    assert sum(float(p.detach().double().sum()) for p in model.parameters()) == params  # the exact draws
    assert float(logits.sum()) == pytest.approx(total, rel=1e-9, abs=1e-9)
    assert torch.equal(logits, again)  # asking for the weights changes no number
    assert alpha.shape == (3, WORDS + 1, 4)  # (B, T, G), each step's weights a distribution over the grid
    torch.testing.assert_close(alpha.sum(2), torch.ones(3, WORDS + 1, dtype=alpha.dtype))
    assert torch.count_nonzero(h) == 0 and (c is None or torch.count_nonzero(c) == 0)


def test_other_methods_ignore_the_attention_fields_and_return_no_weights() -> None:
    torch.manual_seed(0)
    plain = build_captioner(tiny_cfg("lstm", "init"), VOCAB, FEAT)
    torch.manual_seed(0)
    flagged = build_captioner(tiny_cfg("lstm", "init", attention_init=True, attention_penalty=1.0), VOCAB, FEAT)
    assert plain.state_dict().keys() == flagged.state_dict().keys()
    pooled, grid, tokens_in, _ = synthetic_task(images=2)
    logits, alpha = flagged.eval().forward_attended(pooled, grid, tokens_in)
    assert alpha is None and torch.equal(logits, plain.eval()(pooled, grid, tokens_in))


# The shared small spec with attention's two fields searched in place of lr and attention_dim; PENALTY: the
# penalty's distribution.
_SEARCHED = """  lr: {loguniform: [1.0e-3, 1.0e-2]}
  attention_dim: {choice: [32, 64], when: {inject: attention}}"""
_ATTENTION_FIELDS = """  attention_init: {choice: [false, true], when: {inject: attention}}
  attention_penalty: {PENALTY, when: {inject: attention}}"""
SPEC = GOOD_SPEC.replace(_SEARCHED, _ATTENTION_FIELDS)
assert "PENALTY" in SPEC


@pytest.mark.parametrize("penalty", ["choice: [0.0, 1.0]", "uniform: [0.0, 2.0]", "quniform: [0.0, 2.0, 0.5]"])
def test_a_spec_searches_both_fields_for_attention(tmp_path, penalty: str) -> None:
    from study.spec import load_spec

    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.replace("PENALTY", penalty))
    spec = load_spec(path)
    assert not spec.space["attention_init"].matches({"inject": "init"})
    assert spec.space["attention_penalty"].matches({"inject": "attention"})
    cfg = spec.trial_config({"inject": "attention", "attention_init": True, "attention_penalty": 1.0})
    assert cfg.attention_init and cfg.attention_penalty == 1.0


def test_a_negative_penalty_is_refused_naming_the_key(tmp_path) -> None:
    from study.config import ConfigError
    from study.spec import load_spec

    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.replace("PENALTY", "uniform: [-1.0, 1.0]"))
    with pytest.raises(ConfigError, match="attention_penalty"):
        load_spec(path)


def test_full_strength_attention_trial_learns_shapes_and_reports_the_plain_nll(small_shapes, small_prepared, tmp_path):
    """run_trial's training path with the initial state and the penalty: real image features beat shuffled ones on
    the shapes task, and the losses it reports are the NLL alone (a large lambda does not enter them)."""
    import dataclasses

    import numpy as np

    from study.trial.evaluation import Decoding, score_split
    from study.trial.training import run_trial

    cfg = TrialConfig.model_validate(dict(
        dataset=small_shapes, inject="attention", cell="lstm", hidden=128, embed=48, attention_dim=32, dropout=0.0,
        tokens="word", min_count=1, epochs=8, batch_size=40, lr=8e-3, attention_init=True, attention_penalty=1.0,
        precision="fp32"))
    result = run_trial(cfg, small_prepared, work_dir=tmp_path / "a", progress=False)
    losses = [e["train_loss"] for e in result.epochs]
    assert losses[-1] < 0.5 * losses[0] and losses[0] < math.log(200), losses
    vocab, greedy = small_prepared.tokens_for(cfg).vocab, Decoding.of(cfg, beam_size=1)
    real = score_split(result.model, small_prepared, "val", vocab=vocab, decoding=greedy).scores
    shuffled_data = dataclasses.replace(small_prepared, images=dict(small_prepared.images))
    val = small_prepared.images["val"]
    shuffled_data.images["val"] = dataclasses.replace(val, rows=np.roll(val.rows, 7))
    shuffled = score_split(result.model, shuffled_data, "val", vocab=vocab, decoding=greedy).scores
    assert real["CIDEr-D"] > 1.5 * shuffled["CIDEr-D"] + 0.05, (real, shuffled)

    # Its checkpoint carries the init layers: reloaded, it captions exactly as the trained model.
    from study.trial.inference import load_captioner

    reloaded, _, _ = load_captioner(tmp_path / "a" / "checkpoint", torch.device("cpu"))
    assert reloaded.injection.init_c is not None
    beam = Decoding.of(cfg, beam_size=2)
    again = score_split(reloaded, small_prepared, "val", vocab=vocab, decoding=beam).captions
    assert again == score_split(result.model, small_prepared, "val", vocab=vocab, decoding=beam).captions

    # lambda = 1000 would make a penalised loss thousands of nats per token; the reported one stays the NLL.
    heavy = run_trial(cfg.model_copy(update={"attention_penalty": 1000.0, "epochs": 1}), small_prepared,
                      work_dir=tmp_path / "b", progress=False)
    assert heavy.epochs[0]["train_loss"] < math.log(200) and heavy.epochs[0]["val_loss"] < math.log(200)
