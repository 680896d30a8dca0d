"""The one captioner: embedding -> (injection hooks + cell stack) -> vocabulary layer, with decoding.

Every injection method and cell is the same class wired with a different registry entry
(:data:`study.registry.METHODS`, :data:`study.registry.CELLS`); see ``inject.py`` for the hook
order. Dropout (``cfg.dropout``) is applied to the word embeddings, the image features (inside the
injection), between stacked layers (inside the cell) and on the RNN output before the vocabulary layer.
Image features are z-scored per channel first, with train-split statistics kept as buffers (``encode``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from study.config import TrialConfig
from study.data.tokens import PAD
from study.models import decoding
from study.models.cells import CellStack, State, build_cell_stack
from study.models.inject import ImageContext, Injection, build_injection

if TYPE_CHECKING:
    import numpy as np


class Captioner(nn.Module):
    """Teacher-forced training forward, plus greedy and batched beam-search decoding."""

    def __init__(self, injection: Injection, cell: CellStack, vocab_size: int, embed: int, dropout: float) -> None:
        super().__init__()
        if cell.input_size != injection.rnn_input_size:
            raise ValueError(f"cell input size {cell.input_size} != injection's {injection.rnn_input_size}")
        self.injection = injection
        self.cell = cell
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, embed, padding_idx=PAD)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(injection.output_size, vocab_size)
        # Feature normalisation (x - mean) / std per channel, identity until set_feature_stats. Buffers, so a
        # checkpoint carries them and `study caption` normalises new images exactly as in training.
        feature_dim = injection.feature_dim
        for name, value in (("pooled_mean", 0.0), ("pooled_std", 1.0), ("grid_mean", 0.0), ("grid_std", 1.0)):
            self.register_buffer(name, torch.full((feature_dim,), value))

    def set_feature_stats(self, stats: dict[str, Tensor | "np.ndarray"]) -> None:
        """Copy per-channel train-split statistics (``PreparedData.feature_stats``) into the buffers."""
        for name, value in stats.items():
            getattr(self, name).copy_(torch.as_tensor(value))

    @property
    def needs_grid(self) -> bool:
        return self.injection.needs_grid

    # --- the hooks in order -----------------------------------------------------------------------------
    def encode(self, pooled: Tensor, grid: Tensor | None) -> ImageContext:
        """Per-image context from z-scored features. Cached features arrive as float16: cast first."""
        dtype = self.out.weight.dtype
        pooled = (pooled.to(dtype) - self.pooled_mean) / self.pooled_std  # (B, F)
        if grid is not None:
            grid = (grid.to(dtype) - self.grid_mean) / self.grid_std  # (B, G, F)
        return self.injection.encode(pooled, grid)

    def start_state(self, ctx: ImageContext, batch: int) -> State:
        """The state in which START is read: the injection's initial state, then its prefix steps (if any)."""
        state = self.injection.initial_state(ctx, self.cell, batch)
        if state is None:
            state = self.cell.zero_state(batch, self.out.weight)
        prefix = self.injection.prefix_inputs(ctx)  # (B, P, I) or None
        if prefix is not None:
            _, state = self.cell(prefix, state)  # outputs at image steps are dropped: logits align with tokens
        return state

    def step(self, tokens: Tensor, ctx: ImageContext, state: State) -> tuple[Tensor, State]:
        """tokens (B, T) -> logits (B, T, V) and the state after them; T = 1 while decoding."""
        logits, state, _ = self._step(tokens, ctx, state, keep_attention=False)
        return logits, state

    def _step(self, tokens: Tensor, ctx: ImageContext, state: State,
              keep_attention: bool) -> tuple[Tensor, State, Tensor | None]:
        """``step``, and with ``keep_attention`` the attention weights of a teacher-forced pass (B, T, G) (None
        for an injection without attention, or without ``keep_attention``)."""
        emb = self.drop(self.embedding(tokens))  # (B, T, E)
        alphas: list[Tensor] | None = [] if keep_attention and self.injection.attends else None
        if self.injection.stepwise:  # the input at step t depends on the state after t-1 (attention)
            outs = []
            for t in range(emb.shape[1]):
                x, alpha = self.injection.attended_inputs(emb[:, t : t + 1], ctx, state)  # (B, 1, I), (B, 1, G)
                o, state = self.cell.step(x[:, 0], state)
                outs.append(o)  # (B, H)
                if alphas is not None:
                    alphas.append(alpha[:, 0])  # (B, G): k = 1 row per image in a teacher-forced pass
            out = torch.stack(outs, dim=1)  # (B, T, H)
        else:
            out, state = self.cell(self.injection.step_inputs(emb, ctx, state), state)
        logits = self.out(self.injection.combine_output(self.drop(out), ctx))
        return logits, state, (None if not alphas else torch.stack(alphas, dim=1))  # alpha (B, T, G)

    # --- public API -------------------------------------------------------------------------------------
    def forward(self, pooled: Tensor, grid: Tensor | None, tokens_in: Tensor) -> Tensor:
        """pooled (B, F), grid (B, G, F) or None, tokens_in (B, T) starting with START -> logits (B, T, V)."""
        return self.forward_attended(pooled, grid, tokens_in, keep_attention=False)[0]

    def forward_attended(self, pooled: Tensor, grid: Tensor | None, tokens_in: Tensor,
                         keep_attention: bool = True) -> tuple[Tensor, Tensor | None]:
        """``forward`` and the attention weights alpha (B, T, G) that step t read (fp32, or the model's dtype
        if wider; None for a method without attention): what the training's attention penalty needs."""
        ctx = self.encode(pooled, grid)
        logits, _, alpha = self._step(tokens_in, ctx, self.start_state(ctx, tokens_in.shape[0]), keep_attention)
        return logits, alpha

    @torch.no_grad()
    def greedy(self, pooled: Tensor, grid: Tensor | None, max_len: int) -> Tensor:
        """(B, max_len) token ids: END included, PAD after it."""
        return decoding.greedy(self, pooled, grid, max_len)

    @torch.no_grad()
    def beam_search(
        self, pooled: Tensor, grid: Tensor | None, beam_size: int, max_len: int, length_penalty: float = 0.7
    ) -> Tensor:
        """(B, max_len) best ids per image, batched over images; score = log p / length**length_penalty."""
        return decoding.beam_search(self, pooled, grid, beam_size, max_len, length_penalty)


def build_captioner(cfg: TrialConfig, vocab_size: int, feature_dim: int,
                    feature_stats: dict[str, "np.ndarray"] | None = None) -> Captioner:
    """The captioner for one trial: ``cfg.inject`` and ``cfg.cell`` picked from their registries.

    ``feature_stats`` (train-split channel statistics) are applied when ``cfg.normalize_features``; a model
    loaded from a checkpoint gets them from its state dict instead."""
    injection = build_injection(cfg, feature_dim)
    cell = build_cell_stack(cfg.cell, injection.rnn_input_size, cfg.hidden, cfg.layers, cfg.dropout)
    model = Captioner(injection, cell, vocab_size, cfg.embed, cfg.dropout)
    if feature_stats and cfg.normalize_features:
        model.set_feature_stats(feature_stats)
    return model
