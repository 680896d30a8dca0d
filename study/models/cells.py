"""Recurrent cell stacks: fused LSTM, fused GRU, and the seed's peephole LSTM (eq. 1-5).

Every stack has the same interface, so the captioner never asks which cell it holds:

* ``forward(x (B, T, I), state | None) -> (out (B, T, H), state)``.
* ``step(x (B, I), state) -> (out (B, H), state)``: one token, for injections whose input at step t reads the
  state after t-1 (attention). The fused stacks call torch's single-step kernels (``torch.gru_cell``,
  ``torch.lstm_cell``) on the same weights, without ``nn.GRU``/``nn.LSTM``'s per-call set-up.
* ``state`` is always ``(h (L, B, H), c (L, B, H) | None)``; ``c`` is ``None`` for a GRU (``has_memory`` False).
* ``zero_state(batch, like)`` and ``reorder_state(state, index)`` (beam search: pick/expand batch rows).

Build one by name with :func:`build_cell_stack`; the names are registered in :data:`study.registry.CELLS`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from study.config import ConfigError
from study.registry import CELLS, cell_class

State = tuple[Tensor, Tensor | None]  # h (L, B, H), c (L, B, H) or None (GRU)


class CellStack(nn.Module):
    """Base class: ``layers`` stacked recurrent layers of width ``hidden`` with a uniform state type."""

    has_memory: bool = True

    def __init__(self, input_size: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden = hidden
        self.layers = layers
        self.dropout = dropout

    def zero_state(self, batch: int, like: Tensor) -> State:
        """All-zero state on ``like``'s device and dtype."""
        h = like.new_zeros(self.layers, batch, self.hidden)
        return h, (torch.zeros_like(h) if self.has_memory else None)

    @staticmethod
    def reorder_state(state: State, index: Tensor) -> State:
        """Rows ``index`` of the batch dimension: beam search expands images to beams and follows back-pointers."""
        h, c = state
        return h.index_select(1, index), (None if c is None else c.index_select(1, index))

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:  # pragma: no cover
        raise NotImplementedError

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """One time step: x (B, I) -> top layer's output (B, H) and the new state."""
        out, state = self(x[:, None], state)
        return out[:, 0], state

    def _layer_input(self, x: Tensor, layer: int) -> Tensor:
        """Between stacked layers, dropout on the layer below's output (as nn.LSTM/nn.GRU apply it)."""
        return x if layer == 0 else nn.functional.dropout(x, self.dropout, self.training)

    def _weights(self, layer: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rnn = self.rnn
        return (getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"weight_hh_l{layer}"),
                getattr(rnn, f"bias_ih_l{layer}"), getattr(rnn, f"bias_hh_l{layer}"))


class FusedLSTM(CellStack):
    """``torch.nn.LSTM`` (cuDNN / oneDNN kernels; no peepholes), forget-gate bias 1 (Jozefowicz et al. 2015)."""

    has_memory = True

    def __init__(self, input_size: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__(input_size, hidden, layers, dropout)
        self.rnn = nn.LSTM(input_size, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        with torch.no_grad():
            # torch adds b_ih + b_hh; gate order i, f, g, o. Put the whole +1 in b_ih so the sum is exactly 1.
            for layer in range(layers):
                getattr(self.rnn, f"bias_ih_l{layer}")[hidden : 2 * hidden].fill_(1.0)
                getattr(self.rnn, f"bias_hh_l{layer}")[hidden : 2 * hidden].fill_(0.0)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        if state is None:
            state = self.zero_state(x.shape[0], x)
        out, (h, c) = self.rnn(x, state)  # out (B, T, H); h, c (L, B, H)
        return out, (h, c)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        h0, c0 = state  # (L, B, H) each
        hs, cs = [], []
        for layer in range(self.layers):
            h, c = torch.lstm_cell(self._layer_input(x, layer), (h0[layer], c0[layer]), *self._weights(layer))
            hs.append(h)
            cs.append(c)
            x = h  # (B, H)
        return x, (torch.stack(hs), torch.stack(cs))


class FusedGRU(CellStack):
    """``torch.nn.GRU`` (fused kernels).

    Torch's GRU applies the reset gate AFTER the recurrent matrix product,
    ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``, whereas the seed's eq. 7-10 (Cho et al. 2014) reset the
    state before it, ``h~ = tanh(W_xh x + W_hh (h * r) + b_h)``. This is the torch/cuDNN variant; the two are
    reported to perform alike (Chung et al. 2014 use the former), and only this one has fused kernels.
    """

    has_memory = False

    def __init__(self, input_size: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__(input_size, hidden, layers, dropout)
        self.rnn = nn.GRU(input_size, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        h0 = self.zero_state(x.shape[0], x)[0] if state is None else state[0]
        out, h = self.rnn(x, h0)  # out (B, T, H); h (L, B, H)
        return out, (h, None)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        h0 = state[0]  # (L, B, H)
        hs = []
        for layer in range(self.layers):
            x = torch.gru_cell(self._layer_input(x, layer), h0[layer], *self._weights(layer))  # (B, H)
            hs.append(x)
        return x, (torch.stack(hs), None)


class PeepholeLSTMLayer(nn.Module):
    """One layer of the seed's LSTM with diagonal peepholes (eq. 1-5)::

        i = σ(W_xi x + W_hi h + w_ci ⊙ c_prev + b_i)
        f = σ(W_xf x + W_hf h + w_cf ⊙ c_prev + b_f)
        c = f ⊙ c_prev + i ⊙ tanh(W_xc x + W_hc h + b_c)
        o = σ(W_xo x + W_ho h + w_co ⊙ c + b_o)        # the output gate peeks at the NEW c
        h = o ⊙ tanh(c)
    """

    def __init__(self, input_size: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        # Gate blocks in the order i, f, c (candidate), o.
        self.w_x = nn.Parameter(torch.empty(4 * hidden, input_size))
        self.w_h = nn.Parameter(torch.empty(4 * hidden, hidden))
        self.bias = nn.Parameter(torch.empty(4 * hidden))
        self.w_ci = nn.Parameter(torch.empty(hidden))
        self.w_cf = nn.Parameter(torch.empty(hidden))
        self.w_co = nn.Parameter(torch.empty(hidden))
        bound = 1.0 / math.sqrt(hidden)  # nn.LSTM's initialisation, so the cells start alike
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)
        with torch.no_grad():
            self.bias[hidden : 2 * hidden].fill_(1.0)  # forget-gate bias 1

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, I), h and c (B, H) -> out (B, T, H), h, c."""
        H = self.hidden
        # All time steps' input projections in one matmul; only the recurrent part is sequential.
        xp = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.w_x.t()).view(x.shape[0], x.shape[1], 4 * H)
        w_hT = self.w_h.t()
        outs = []
        for t in range(x.shape[1]):
            gates = torch.addmm(xp[:, t], h, w_hT)  # (B, 4H)
            g_i, g_f, g_c, g_o = gates.split(H, dim=1)
            i = torch.sigmoid(g_i + self.w_ci * c)
            f = torch.sigmoid(g_f + self.w_cf * c)
            c = f * c + i * torch.tanh(g_c)
            o = torch.sigmoid(g_o + self.w_co * c)
            h = o * torch.tanh(c)
            outs.append(h)
        return torch.stack(outs, dim=1), h, c


class PeepholeLSTM(CellStack):
    """Stack of :class:`PeepholeLSTMLayer` (the seed's eq. 1-5) with dropout between layers, like ``nn.LSTM``."""

    has_memory = True

    def __init__(self, input_size: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__(input_size, hidden, layers, dropout)
        self.cells = nn.ModuleList(
            PeepholeLSTMLayer(input_size if k == 0 else hidden, hidden) for k in range(layers)
        )
        self.between = nn.Dropout(dropout if layers > 1 else 0.0)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        h0, c0 = self.zero_state(x.shape[0], x) if state is None else state
        hs, cs = [], []
        out = x
        for k, cell in enumerate(self.cells):
            if k > 0:
                out = self.between(out)
            out, h, c = cell(out, h0[k], c0[k])  # out (B, T, H)
            hs.append(h)
            cs.append(c)
        return out, (torch.stack(hs), torch.stack(cs))


def build_cell_stack(name: str, input_size: int, hidden: int, layers: int, dropout: float) -> CellStack:
    """The cell stack registered as ``name`` in :data:`study.registry.CELLS`; an unknown name is a
    ``ConfigError`` listing the valid ones."""
    if name not in CELLS:
        raise ConfigError(f"cell: unknown cell {name!r}; valid cells: {', '.join(sorted(CELLS))}")
    return cell_class(name)(input_size, hidden, layers, dropout)
