"""Where the image enters the decoder: one small module per injection method, registered by name (with
its role in the verdict, whether it needs the grid and its colour) in :data:`study.registry.METHODS`.

The :class:`~study.models.captioner.Captioner` owns the embedding, the cell stack and the output layer and
calls these hooks in this order (self-critical.pytorch's "core" idea: a variant is a hook set, not a model):

1. ``encode(pooled (B, F), grid (B, G, F) | None) -> ctx``: per-image tensors, computed once per image and
   shared by every step and beam; a dict of batch-first tensors (so beams can index them).
2. ``initial_state(ctx, cell, batch) -> state | None``: the recurrent state before any input (None: zeros).
3. ``prefix_inputs(ctx) -> (B, P, I) | None``: input steps run before the first word; their outputs dropped.
4. ``step_inputs(emb (B, T, E), ctx, state) -> (B, T, I)``: the RNN input for word steps. ``stepwise``
   injections need the previous state per step, so the captioner feeds them one token at a time, through
   ``attended_inputs`` (the same input and the attention weights (B, k, G) it used, None for no attention),
   which the teacher-forced ``Captioner.forward_attended`` collects for the training's attention penalty.
5. ``combine_output(out (B, T, H), ctx) -> (B, T, output_size)``: what the vocabulary layer sees.
6. ``expand_ctx(ctx, K)``: beam search's view of ctx for B*K rows (image-major: K consecutive rows per image).

Each module sets ``rnn_input_size`` (I) and ``output_size`` from the trial config. The defaults below are
"no image": the ``none`` method is this base class.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from study.config import ConfigError, TrialConfig
from study.data.tokens import PAD
from study.models.cells import CellStack, State
from study.registry import METHODS, cell_class

# What an injection method makes of the image once per batch, by name (e.g. "image": the (B, F) pooled vector,
# attention's grid keys (B, G, A)), handed to every decoding step.
ImageContext = dict[str, Tensor]


class Injection(nn.Module):
    """No image at all (the language-model floor); the other methods override a few hooks."""

    needs_grid: bool = False  # True: ``encode`` needs the grid (B, G, F); set by build_injection from the registry
    stepwise: bool = False  # True: ``step_inputs`` reads the state, so words go in one at a time
    attends: bool = False  # True: ``attended_inputs`` returns attention weights (the training's penalty reads them)

    def __init__(self, cfg: TrialConfig, feature_dim: int) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.rnn_input_size = cfg.embed
        self.output_size = cfg.hidden
        self.drop = nn.Dropout(cfg.dropout)  # on image features, like on embeddings

    def encode(self, pooled: Tensor, grid: Tensor | None) -> ImageContext:
        return {}

    def initial_state(self, ctx: ImageContext, cell: CellStack, batch: int) -> State | None:
        return None

    def prefix_inputs(self, ctx: ImageContext) -> Tensor | None:
        return None

    def step_inputs(self, emb: Tensor, ctx: ImageContext, state: State) -> Tensor:
        return emb

    def attended_inputs(self, emb: Tensor, ctx: ImageContext, state: State) -> tuple[Tensor, Tensor | None]:
        """A stepwise injection's step: ``step_inputs`` and the attention weights (B, k, G) it used (None here)."""
        return self.step_inputs(emb, ctx, state), None

    def combine_output(self, out: Tensor, ctx: ImageContext) -> Tensor:
        return out

    def expand_ctx(self, ctx: ImageContext, beams: int) -> ImageContext:
        """Beam search: ctx (B, ...) -> (B*K, ...), each image's tensors repeated for its K consecutive rows."""
        return {name: value.repeat_interleave(beams, dim=0) for name, value in ctx.items()}


class InitInject(Injection):
    """Memory seeding (the seed's proposal): a linear projection of the pooled image is the first layer's c0.

    With ``cfg.seed_h`` the first layer's h0 is also seeded, as ``tanh`` of a second projection (h is bounded
    in (-1, 1), c is not). A GRU has no c, so it gets ``tanh`` of the c-projection as its h0 (Tanti et al.'s
    init). Deeper layers start at zero.
    """

    def __init__(self, cfg: TrialConfig, feature_dim: int) -> None:
        super().__init__(cfg, feature_dim)
        self.to_c = nn.Linear(feature_dim, cfg.hidden)
        self.to_h = nn.Linear(feature_dim, cfg.hidden) if cfg.seed_h else None

    def encode(self, pooled: Tensor, grid: Tensor | None) -> ImageContext:
        return {"image": self.drop(pooled)}

    def initial_state(self, ctx: ImageContext, cell: CellStack, batch: int) -> State:
        img = ctx["image"]  # (B, F)
        h, c = cell.zero_state(batch, img)  # (L, B, H) each (c None for a GRU)
        seed_c = self.to_c(img)  # (B, H)
        if c is None:
            h = torch.cat([torch.tanh(seed_c)[None], h[1:]])
        else:
            c = torch.cat([seed_c[None], c[1:]])
            if self.to_h is not None:
                h = torch.cat([torch.tanh(self.to_h(img))[None], h[1:]])
        return h, c


class ProjectedImage(Injection):
    """Shared by pre, par and merge: ``ctx["image"]`` is a linear projection of the pooled vector to ``size``."""

    def __init__(self, cfg: TrialConfig, feature_dim: int, size: int) -> None:
        super().__init__(cfg, feature_dim)
        self.proj = nn.Linear(feature_dim, size)

    def encode(self, pooled: Tensor, grid: Tensor | None) -> ImageContext:
        return {"image": self.proj(self.drop(pooled))}  # (B, size)


class PreInject(ProjectedImage):
    """Show and Tell: the projected image is the input of one step before START; that step's output is dropped."""

    def __init__(self, cfg: TrialConfig, feature_dim: int) -> None:
        super().__init__(cfg, feature_dim, cfg.embed)

    def prefix_inputs(self, ctx: ImageContext) -> Tensor:
        return ctx["image"][:, None]  # (B, 1, E)


class ParInject(ProjectedImage):
    """LRCN: the projected image is concatenated to the word embedding at every step."""

    def __init__(self, cfg: TrialConfig, feature_dim: int) -> None:
        super().__init__(cfg, feature_dim, cfg.embed)
        self.rnn_input_size = 2 * cfg.embed

    def step_inputs(self, emb: Tensor, ctx: ImageContext, state: State) -> Tensor:
        img = ctx["image"][:, None].expand(-1, emb.shape[1], -1)  # (B, T, E)
        return torch.cat([emb, img], dim=2)  # (B, T, 2E)


class MergeInject(ProjectedImage):
    """Merge (m-RNN, Tanti et al.): the RNN sees only words; the projected image is concatenated to its output
    and the vocabulary layer (a linear map of the concatenation) sees both."""

    def __init__(self, cfg: TrialConfig, feature_dim: int) -> None:
        super().__init__(cfg, feature_dim, cfg.hidden)
        self.output_size = 2 * cfg.hidden

    def combine_output(self, out: Tensor, ctx: ImageContext) -> Tensor:
        img = ctx["image"][:, None].expand(-1, out.shape[1], -1)  # (B, T, H)
        return torch.cat([out, img], dim=2)  # (B, T, 2H)


class AttentionInject(Injection):
    """Show, Attend and Tell soft attention: at each step, additive attention over the grid keyed by the
    previous top-layer hidden state gives a context vector (B, F), concatenated to the word embedding.

    ``alpha = softmax_g(v . tanh(W_a a_g + W_h h_prev))``, ``z = sum_g alpha_g a_g``. By default the state starts
    at zero, so the image enters only through attention. With ``cfg.attention_init`` it starts as Xu et al.'s
    (2015, sec. 3.1.2: learned maps of the mean annotation): from the mean annotation vector
    ``abar = mean_g a_g`` (B, F) of the grid the attention reads (z-scored, after feature dropout), every layer l
    gets ``h0_l = tanh(W_h,l abar + b_h,l)`` and, for LSTM cells (``lstm``, ``lstm_peephole``),
    ``c0_l = tanh(W_c,l abar + b_c,l)``; a GRU has no c and gets h0 alone. Xu et al. have one layer; a stack gets
    one map per layer (one Linear to L x H each for h and c). The layers are created after the attention's own,
    so a config without the option builds, draws and loads exactly as before. Xu et al.'s doubly stochastic
    penalty on the weights (sec. 4.2.1; ``cfg.attention_penalty``, :func:`doubly_stochastic_penalty`) is added
    by the training loop (``study.trial.training``), from the weights ``Captioner.forward_attended`` returns.
    """

    stepwise = True
    attends = True

    def __init__(self, cfg: TrialConfig, feature_dim: int) -> None:
        super().__init__(cfg, feature_dim)
        self.key = nn.Linear(feature_dim, cfg.attention_dim)
        self.query = nn.Linear(cfg.hidden, cfg.attention_dim, bias=False)
        self.score = nn.Linear(cfg.attention_dim, 1, bias=False)
        self.rnn_input_size = cfg.embed + feature_dim
        self.init_h: nn.Linear | None = None
        self.init_c: nn.Linear | None = None
        if cfg.attention_init:  # only then: the default's parameters and their RNG draws stay as they were
            self.init_h = nn.Linear(feature_dim, cfg.layers * cfg.hidden)
            has_c = cell_class(cfg.cell).has_memory  # LSTM cells; a GRU's state is h alone
            self.init_c = nn.Linear(feature_dim, cfg.layers * cfg.hidden) if has_c else None

    def encode(self, pooled: Tensor, grid: Tensor | None) -> ImageContext:
        if grid is None:
            raise ValueError("inject 'attention' needs the spatial grid features (B, G, F), got grid=None")
        kind = grid.device.type
        if torch.is_autocast_enabled(kind):
            # Once per image: autocast would otherwise cast the (B, G, F) grid for the context bmm at every step.
            grid = grid.to(torch.get_autocast_dtype(kind))
        grid = grid_dropout(grid, self.drop.p, self.training)  # (B, G, F)
        return {"grid": grid, "keys": self.key(grid)}  # keys (B, G, A): once per image, not per step

    def initial_state(self, ctx: ImageContext, cell: CellStack, batch: int) -> State | None:
        """Zeros (None), or with ``attention_init`` tanh of the learned maps of the mean annotation vector:
        h (L, B, H) and, for LSTM cells, c (L, B, H). Called once per image, before beam search expands it."""
        if self.init_h is None:
            return None
        dtype = self.init_h.weight.dtype  # the state is kept in the weights' dtype, like the zero state
        mean = ctx["grid"].mean(dim=1, dtype=dtype)  # (B, F), accumulated in fp32 even for an autocast grid

        def per_layer(linear: nn.Linear) -> Tensor:  # (B, L*H) -> (L, B, H)
            out = torch.tanh(linear(mean)).to(dtype)
            return out.view(batch, cell.layers, cell.hidden).transpose(0, 1).contiguous()

        return per_layer(self.init_h), (None if self.init_c is None else per_layer(self.init_c))

    def expand_ctx(self, ctx: ImageContext, beams: int) -> ImageContext:
        """Beam search: keep the grid per image. ``attend`` reads each image's ``beams`` consecutive rows against
        it, so the (B*K, G, F) copy (and reading it K times per step) is never made."""
        return ctx

    def attend(self, ctx: ImageContext, h_top: Tensor) -> Tensor:
        """h_top (B*k, H), k consecutive rows per image (k = 1 in training, the beams in beam search)
        -> attention weights (B, k, G)."""
        keys = ctx["keys"]  # (B, G, A)
        query = self.query(h_top).view(keys.shape[0], -1, 1, keys.shape[2])  # (B, k, 1, A)
        energy = torch.tanh(keys[:, None] + query)  # (B, k, G, A), in the autocast dtype when there is one
        scores = self.score(energy).squeeze(3)  # (B, k, G)
        return torch.softmax(scores, dim=2, dtype=torch.promote_types(scores.dtype, torch.float32))

    def step_inputs(self, emb: Tensor, ctx: ImageContext, state: State) -> Tensor:
        return self.attended_inputs(emb, ctx, state)[0]

    def attended_inputs(self, emb: Tensor, ctx: ImageContext, state: State) -> tuple[Tensor, Tensor]:
        """emb (B*k, 1, E) -> the step's input (B*k, 1, E + F) and its attention weights alpha (B, k, G)."""
        if emb.shape[1] != 1:
            raise ValueError(f"attention takes one step at a time, got {emb.shape[1]} steps")
        alpha = self.attend(ctx, state[0][-1])  # (B, k, G)
        context = torch.bmm(alpha, ctx["grid"])  # (B, k, F): one matrix product per image, not per beam
        return torch.cat([emb, context.view(emb.shape[0], 1, -1)], dim=2), alpha  # (B*k, 1, E + F)


def doubly_stochastic_penalty(alpha: Tensor, targets: Tensor) -> Tensor:
    """Xu et al.'s attention penalty, summed over captions: ``sum_b sum_g (1 - sum_t alpha_btg)^2`` where t runs
    over caption b's real steps (target not PAD). alpha (B, T, G) (row t: the weights step t read to predict
    ``targets[:, t]``), targets (B, T) -> a scalar in alpha's dtype. It pushes every grid cell to be attended
    about once over a caption, so no region is ignored."""
    real = (targets != PAD).to(alpha.dtype)  # (B, T)
    coverage = torch.einsum("btg,bt->bg", alpha, real)  # (B, G): each cell's weight summed over real steps
    return (1.0 - coverage).square().sum()


def grid_dropout(grid: Tensor, p: float, training: bool) -> Tensor:
    """Dropout of the (B, G, F) grid: each element kept with probability 1 - p and scaled by 1 / (1 - p), as
    ``nn.Dropout``, with the mask drawn by ``torch.rand`` instead of ``bernoulli_``: for the Flickr8k batch
    (64 x 49 x 1280) that is about 3x cheaper on the CPU (benchmarks/profile_attention.py), where
    ``nn.Dropout`` of the grid cost a third of an fp32 attention step. Same distribution, another random stream."""
    if not training or p == 0.0:
        return grid
    keep = torch.rand(grid.shape, device=grid.device) >= p  # fp32 draws: bf16 rand_like is slower on the CPU
    return grid * keep.to(grid.dtype).mul_(1.0 / (1.0 - p))


def build_injection(cfg: TrialConfig, feature_dim: int) -> Injection:
    """The injection registered as ``cfg.inject`` in :data:`study.registry.METHODS`; an unknown name is a
    ``ConfigError`` listing the valid ones."""
    if cfg.inject not in METHODS:
        raise ConfigError(f"inject: unknown injection {cfg.inject!r}; valid: {', '.join(sorted(METHODS))}")
    method = METHODS[cfg.inject]
    injection = method.injection_class()(cfg, feature_dim)
    # The registry decides whether the grid is needed: the driver reads the same flag, without torch, to
    # choose which features to extract, so the classes do not repeat it.
    injection.needs_grid = method.needs_grid
    return injection
