"""Greedy and beam-search decoding over any :class:`~study.models.captioner.Captioner`.

Both use only the captioner's hooks (``encode``, ``start_state``, ``step``) and the cell's ``reorder_state``,
so they work for every cell x injection combination. PAD and START are never generated (their logits are
untrained or meaningless after the first step); UNK may be. Outputs are (B, max_len) ids with END included
and PAD after it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from study.data.tokens import END, PAD, START

if TYPE_CHECKING:
    from study.models.captioner import Captioner


def _forbid_specials(logp: Tensor) -> Tensor:
    logp[:, PAD] = float("-inf")
    logp[:, START] = float("-inf")
    return logp


def greedy(model: "Captioner", pooled: Tensor, grid: Tensor | None, max_len: int) -> Tensor:
    """Most likely next token at each step -> (B, max_len) ids."""
    batch, device = pooled.shape[0], pooled.device
    ctx = model.encode(pooled, grid)
    state = model.start_state(ctx, batch)
    out = torch.full((batch, max_len), PAD, dtype=torch.long, device=device)
    token = torch.full((batch, 1), START, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for t in range(max_len):
        logits, state = model.step(token, ctx, state)  # (B, 1, V)
        word = _forbid_specials(logits[:, -1].float()).argmax(dim=1)  # (B,)
        word = word.masked_fill(done, PAD)
        out[:, t] = word
        done |= word == END
        if bool(done.all()):
            break
        token = word[:, None]
    return out


def _continuations(logits: Tensor, finished: Tensor) -> Tensor:
    """(B*K, V) log-probabilities of each row's next word (PAD and START forbidden); a finished row's only
    continuation is PAD, which costs nothing and adds no length."""
    logp = _forbid_specials(torch.log_softmax(logits[:, -1].float(), dim=1))
    pad_only = torch.full_like(logp, float("-inf"))
    pad_only[:, PAD] = 0.0
    return torch.where(finished[:, None], pad_only, logp)


def beam_search(model: "Captioner", pooled: Tensor, grid: Tensor | None, beam_size: int, max_len: int,
                length_penalty: float = 0.7) -> Tensor:
    """Beam search batched over images: B*K rows go through the model at once -> (B, max_len) best ids.

    Hypotheses are ranked by ``sum log p / length**length_penalty`` (length counts END). A hypothesis that
    emitted END stays in the beam with a frozen score (it can only be extended by PAD at no cost, and its
    length stops growing), so finished captions compete with unfinished ones until the end.
    """
    batch, k, device = pooled.shape[0], beam_size, pooled.device
    ctx = model.encode(pooled, grid)
    state = model.start_state(ctx, batch)
    # Rows are image-major (row b*K + j is beam j of image b); back-pointers never leave an image's block, so
    # the per-image context only needs expanding once, while the state follows the back-pointers.
    expand = torch.arange(batch, device=device).repeat_interleave(k)  # (B*K,)
    ctx = model.injection.expand_ctx(ctx, k)
    state = model.cell.reorder_state(state, expand)

    logp_sum = torch.zeros(batch, k, device=device)
    logp_sum[:, 1:] = float("-inf")  # at the start all beams are equal: expand only beam 0
    logp_sum = logp_sum.view(-1)  # (B*K,)
    length = torch.zeros(batch * k, device=device)
    finished = torch.zeros(batch * k, dtype=torch.bool, device=device)
    tokens = torch.full((batch * k, max_len), PAD, dtype=torch.long, device=device)
    token = torch.full((batch * k, 1), START, dtype=torch.long, device=device)
    block = (torch.arange(batch, device=device) * k)[:, None]  # (B, 1) first row of each image

    for t in range(max_len):
        logits, state = model.step(token, ctx, state)  # (B*K, 1, V)
        logp = _continuations(logits, finished)  # (B*K, V)
        vocab = logp.shape[1]
        cand_len = length + (~finished).float()  # (B*K,)
        total = logp_sum[:, None] + logp  # (B*K, V)
        score = total / cand_len[:, None] ** length_penalty
        _, best = score.view(batch, k * vocab).topk(k, dim=1)  # (B, K) over each image's K*V candidates
        rows = (block + best // vocab).view(-1)  # (B*K,) back-pointers
        word = (best % vocab).view(-1)  # (B*K,)
        logp_sum = total.view(batch, k * vocab).gather(1, best).view(-1)
        length = cand_len[rows]
        finished = finished[rows] | (word == END)
        tokens = tokens[rows]
        tokens[:, t] = word
        state = model.cell.reorder_state(state, rows)
        if bool(finished.all()):
            break
        token = word[:, None]

    final = (logp_sum / length.clamp(min=1.0) ** length_penalty).view(batch, k)
    choice = final.argmax(dim=1)  # (B,)
    return tokens.view(batch, k, max_len)[torch.arange(batch, device=device), choice]
