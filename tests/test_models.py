"""Cells, injection methods, the captioner and its decoders: learning, known answers, equivalences."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from study.config import ConfigError
from study.data.tokens import END, PAD, START
from study.models import build_captioner, build_cell_stack
from study.models.cells import PeepholeLSTM
from study.registry import CELLS, METHODS
from tests.helpers import CLASSES, FEAT, VOCAB, WORDS, synthetic_task, tiny_cfg

torch.set_num_threads(1)

def loss_of(model, pooled, grid, tokens_in, targets) -> torch.Tensor:
    logits = model(pooled, grid, tokens_in)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PAD)


@pytest.mark.parametrize("inject", sorted(METHODS))
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_every_combination_learns_the_image_dependent_task(cell: str, inject: str) -> None:
    torch.manual_seed(0)
    pooled, grid, tokens_in, targets = synthetic_task()
    model = build_captioner(tiny_cfg(cell, inject), VOCAB, FEAT)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    initial = loss_of(model, pooled, grid, tokens_in, targets).item()
    assert initial == pytest.approx(math.log(VOCAB), rel=0.15)
    for _ in range(120):
        opt.zero_grad()
        loss = loss_of(model, pooled, grid, tokens_in, targets)
        loss.backward()
        opt.step()
    final = loss_of(model, pooled, grid, tokens_in, targets).item()
    assert final < 0.3 * initial
    floor_without_image = math.log(CLASSES) / (WORDS + 1)  # 0.347: entropy of the caption given nothing
    if inject == "none":
        assert final > 0.9 * floor_without_image  # cannot beat the entropy bound: the task needs the image
    else:
        assert final < 0.5 * floor_without_image
        # ... and it decodes the right caption for (almost) every image.
        model.eval()
        decoded = model.greedy(pooled, grid, max_len=WORDS + 3)
        correct = (decoded[:, : WORDS + 1] == targets).all(dim=1) & (decoded[:, WORDS + 1 :] == PAD).all(dim=1)
        assert correct.float().mean().item() >= 0.9


@pytest.mark.parametrize("inject", sorted(METHODS))
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_logit_shapes_for_every_combination(cell: str, inject: str) -> None:
    model = build_captioner(tiny_cfg(cell, inject, layers=2, dropout=0.3), VOCAB, FEAT)
    pooled, grid, tokens_in, _ = synthetic_task(images=3)
    assert model(pooled, grid, tokens_in).shape == (3, WORDS + 1, VOCAB)
    assert model.needs_grid == METHODS[inject].needs_grid == (inject == "attention")


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="gru, lstm, lstm_peephole"):
        build_cell_stack("lstn", 4, 8, 1, 0.0)
    with pytest.raises(ConfigError, match="attention, init, merge, none, par, pre"):
        # model_copy skips validation: the registry's own check, whatever TrialConfig checks up front.
        build_captioner(tiny_cfg("lstm", "init").model_copy(update={"inject": "inits"}), VOCAB, FEAT)


def test_attention_without_grid_is_an_error() -> None:
    model = build_captioner(tiny_cfg("lstm", "attention"), VOCAB, FEAT)
    pooled, _, tokens_in, _ = synthetic_task(images=2)
    with pytest.raises(ValueError, match="grid"):
        model(pooled, None, tokens_in)


def test_forget_gate_bias_is_one() -> None:
    H = 8
    lstm = build_cell_stack("lstm", 4, H, 2, 0.0).rnn
    for k in range(2):
        total = getattr(lstm, f"bias_ih_l{k}") + getattr(lstm, f"bias_hh_l{k}")
        assert torch.equal(total[H : 2 * H], torch.ones(H))
    peep = build_cell_stack("lstm_peephole", 4, H, 2, 0.0)
    for layer in peep.cells:
        assert torch.equal(layer.bias[H : 2 * H].detach(), torch.ones(H))


# --- init: memory seeding -----------------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["lstm", "lstm_peephole", "gru"])
@pytest.mark.parametrize("seed_h", [False, True])
def test_init_seeds_the_first_layer_only(cell: str, seed_h: bool) -> None:
    torch.manual_seed(0)
    model = build_captioner(tiny_cfg(cell, "init", layers=2, seed_h=seed_h), VOCAB, FEAT).double().eval()
    pooled = torch.randn(3, FEAT, dtype=torch.float64)
    h, c = model.start_state(model.encode(pooled, None), 3)
    inj = model.injection
    projected = pooled @ inj.to_c.weight.T + inj.to_c.bias  # (B, H)
    if cell == "gru":
        assert c is None
        torch.testing.assert_close(h[0], torch.tanh(projected))
    else:
        torch.testing.assert_close(c[0], projected)
        assert torch.count_nonzero(c[1]) == 0
        if seed_h:
            torch.testing.assert_close(h[0], torch.tanh(pooled @ inj.to_h.weight.T + inj.to_h.bias))
        else:
            assert torch.count_nonzero(h[0]) == 0
    assert torch.count_nonzero(h[1]) == 0


# --- the peephole cell against the seed's equations ---------------------------------------------------


def reference_peephole(stack: PeepholeLSTM, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor):
    """The seed's eq. 1-5 written gate by gate, one step at a time, from the stack's parameters."""
    out = x
    hs, cs = [], []
    for k, layer in enumerate(stack.cells):
        H = layer.hidden
        W_xi, W_xf, W_xc, W_xo = layer.w_x.split(H, 0)
        W_hi, W_hf, W_hc, W_ho = layer.w_h.split(H, 0)
        b_i, b_f, b_c, b_o = layer.bias.split(H, 0)
        h, c = h0[k], c0[k]
        steps = []
        for t in range(out.shape[1]):
            xt = out[:, t]
            i = torch.sigmoid(xt @ W_xi.T + h @ W_hi.T + layer.w_ci * c + b_i)
            f = torch.sigmoid(xt @ W_xf.T + h @ W_hf.T + layer.w_cf * c + b_f)
            c = f * c + i * torch.tanh(xt @ W_xc.T + h @ W_hc.T + b_c)
            o = torch.sigmoid(xt @ W_xo.T + h @ W_ho.T + layer.w_co * c + b_o)  # the new c
            h = o * torch.tanh(c)
            steps.append(h)
        out = torch.stack(steps, 1)
        hs.append(h)
        cs.append(c)
    return out, torch.stack(hs), torch.stack(cs)


def test_peephole_matches_the_seed_equations() -> None:
    torch.manual_seed(0)
    stack = build_cell_stack("lstm_peephole", 5, 7, 2, 0.0).double()
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    h0, c0 = torch.randn(2, 2, 3, 7, dtype=torch.float64)
    out, (h, c) = stack(x, (h0, c0))
    ref_out, ref_h, ref_c = reference_peephole(stack, x, h0, c0)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(h, ref_h)
    torch.testing.assert_close(c, ref_c)
    # Stepping one token at a time gives the same as the whole sequence.
    state = (h0, c0)
    for t in range(6):
        o, state = stack(x[:, t : t + 1], state)
        torch.testing.assert_close(o[:, 0], ref_out[:, t])


def test_peephole_gradcheck() -> None:
    torch.manual_seed(0)
    stack = build_cell_stack("lstm_peephole", 3, 4, 2, 0.0).double()
    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)

    def run(x, h0, c0, *params):
        out, (h, c) = torch.func.functional_call(stack, dict(zip(names, params)), (x, (h0, c0)))
        return out, h, c

    names = [n for n, _ in stack.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in stack.named_parameters()]
    assert torch.autograd.gradcheck(run, (x, h0, c0, *params))


# --- decoding -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("inject", sorted(METHODS))
def test_beam_of_one_is_greedy(inject: str) -> None:
    torch.manual_seed(1)
    model = build_captioner(tiny_cfg("lstm", inject, layers=2), VOCAB, FEAT).double().eval()
    pooled, grid, _, _ = synthetic_task(images=6, seed=1)
    greedy = model.greedy(pooled, grid, max_len=10)
    torch.testing.assert_close(model.beam_search(pooled, grid, beam_size=1, max_len=10), greedy)


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize(("inject", "extra"), [("init", {}), ("pre", {}), ("attention", {}), ("none", {}),
                                               ("attention", {"attention_init": True})])
def test_batched_beam_search_equals_per_image(cell: str, inject: str, extra: dict) -> None:
    torch.manual_seed(2)
    model = build_captioner(tiny_cfg(cell, inject, layers=2, **extra), VOCAB, FEAT).double().eval()
    pooled, grid, _, _ = synthetic_task(images=5, seed=2)
    batched = model.beam_search(pooled, grid, beam_size=3, max_len=8)
    one_by_one = torch.cat([model.beam_search(pooled[i : i + 1], grid[i : i + 1], 3, 8) for i in range(5)])
    torch.testing.assert_close(batched, one_by_one)


def test_decoded_ids_end_then_pad_and_never_pad_or_start_before() -> None:
    torch.manual_seed(3)
    model = build_captioner(tiny_cfg("gru", "par"), VOCAB, FEAT).eval()
    pooled, grid, _, _ = synthetic_task(images=16, seed=3)
    for ids in (model.greedy(pooled, grid, 12), model.beam_search(pooled, grid, 4, 12)):
        assert ids.shape == (16, 12)
        for row in ids.tolist():
            n = row.index(END) + 1 if END in row else len(row)
            assert PAD not in row[:n] and START not in row[:n]
            assert all(tok == PAD for tok in row[n:])


def test_beam_search_finds_a_better_scored_caption_than_greedy() -> None:
    """With length_penalty 0 the beam score is the summed log-prob: a wide beam (10 of 24 words, 6 steps) scores
    no worse than greedy on any image here and strictly better on some (greedy's prefix gets outbid)."""
    torch.manual_seed(4)
    model = build_captioner(tiny_cfg("lstm", "init", hidden=16), VOCAB, FEAT).double().eval()
    pooled, grid, _, _ = synthetic_task(images=12, seed=4)

    def logprob(ids: torch.Tensor) -> torch.Tensor:
        tokens_in = torch.cat([torch.full((ids.shape[0], 1), START), ids[:, :-1]], 1)
        logp = torch.log_softmax(model(pooled, grid, tokens_in), -1).gather(2, ids[:, :, None])[..., 0]
        return (logp * (ids != PAD)).sum(1)

    greedy = logprob(model.greedy(pooled, grid, 6))
    beam = logprob(model.beam_search(pooled, grid, 10, 6, length_penalty=0.0))
    assert (beam >= greedy - 1e-9).all()
    assert (beam > greedy + 1e-6).sum() >= 1


def _per_token_module_call(model) -> None:
    """Give ``model``'s cell stack the step it had before the single-step kernels: the whole ``nn.GRU`` /
    ``nn.LSTM`` module called on a (B, 1, I) sequence (``CellStack.step``, the generic path)."""
    from types import MethodType

    from study.models.cells import CellStack

    model.cell.step = MethodType(CellStack.step, model.cell)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_attention_step_equals_the_per_token_module_call(cell: str, layers: int) -> None:
    """The cheaper attention step (torch.gru_cell / lstm_cell on the stack's own weights, the grid cast once)
    changes no number: logits, every gradient and beam captions equal the per-token nn.GRU/nn.LSTM formula."""
    torch.manual_seed(0)
    cfg = tiny_cfg(cell, "attention", layers=layers)
    fast = build_captioner(cfg, VOCAB, FEAT).double().eval()  # eval: dropout off, so both see the same numbers
    slow = build_captioner(cfg, VOCAB, FEAT).double().eval()
    slow.load_state_dict(fast.state_dict())
    _per_token_module_call(slow)
    pooled, grid, tokens_in, targets = synthetic_task(images=6)
    pooled, grid = pooled.double(), grid.double()
    losses = []
    for model in (fast, slow):
        logits = model(pooled, grid, tokens_in)
        loss = loss_of(model, pooled, grid, tokens_in, targets)
        loss.backward()
        losses.append((logits, loss))
    assert torch.allclose(losses[0][0], losses[1][0], atol=1e-12)
    for (name, a), b in zip(fast.named_parameters(), slow.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-12), name
    assert torch.equal(fast.beam_search(pooled, grid, 3, 8), slow.beam_search(pooled, grid, 3, 8))


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_attention_under_bf16_autocast_stays_near_fp32(cell: str) -> None:
    """Under bf16 autocast the attention step (grid cast once, energy in bf16, softmax in fp32) gives the fp32
    loss to bf16's precision: within 1% relative on an untrained model."""
    from study.trial.precision import autocast

    torch.manual_seed(0)
    model = build_captioner(tiny_cfg(cell, "attention", hidden=64), VOCAB, FEAT).eval()
    pooled, grid, tokens_in, targets = synthetic_task(images=16)
    losses = []
    for precision in ("fp32", "bf16"):
        with autocast(torch.device("cpu"), precision):
            logits = model(pooled, grid, tokens_in)
        assert logits.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        losses.append(float(F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1))))
    assert losses[1] == pytest.approx(losses[0], rel=0.01)
