"""Caption text -> token ids and back, at word or character level.

Both vocabularies share the four special ids (PAD, START, END, UNK), so the models and the decoders never
need to know which kind they are working with. A vocabulary is built from the TRAIN captions only (val/test
words the model never saw become UNK, as in deployment) and is saved as JSON next to prepared data and in
checkpoints.

The metrics do not use these tokens: they score the decoded text against the raw reference captions, both
tokenised by coco-caption's PTB tokenizer (:func:`study.trial.ptb.ptb_tokenize`, or the Java original in the
full suite), as the literature does, so hypotheses and references get the same normalisation.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from study.records.files import atomic_write_text

PAD, START, END, UNK = 0, 1, 2, 3
SPECIALS = ["<pad>", "<start>", "<end>", "<unk>"]  # itos[:4], in id order

# Anything that is not a letter, digit, whitespace or apostrophe becomes a space ("dog,cat" -> "dog cat").
# `\w` also matches '_', which is punctuation for us, hence the explicit alternative.
_PUNCT = re.compile(r"[^\w\s']|_")


def normalize(text: str) -> str:
    """Lower-case, replace punctuation by spaces (keep letters, digits and ``'``), collapse whitespace."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def word_tokens(text: str) -> list[str]:
    """Word tokens of a caption: ``normalize(text).split()``."""
    return normalize(text).split()


def char_tokens(text: str) -> list[str]:
    """Character tokens of a caption, spaces included: ``list(normalize(text))``."""
    return list(normalize(text))


# Registry of token kinds: the only place that knows how each kind splits a caption.
TOKENIZERS: dict[str, Callable[[str], list[str]]] = {"word": word_tokens, "char": char_tokens}
_JOINERS = {"word": " ", "char": ""}


def _check_kind(kind: str) -> str:
    if kind not in TOKENIZERS:
        raise ValueError(f"unknown token kind {kind!r}; valid kinds: {sorted(TOKENIZERS)}")
    return kind


class Vocab:
    """A word- or character-level vocabulary: ``itos[id] -> token`` and the reverse map."""

    FORMAT = 1  # bump when the saved layout changes

    def __init__(self, kind: str, itos: list[str]) -> None:
        self.kind = _check_kind(kind)
        if list(itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {list(itos[:len(SPECIALS)])}")
        if len(set(itos)) != len(itos):
            raise ValueError("vocabulary tokens must be unique")
        self.itos: list[str] = list(itos)
        self.stoi: dict[str, int] = {tok: i for i, tok in enumerate(self.itos)}

    # ---------------------------------------------------------------------------------------- building
    @classmethod
    def build(cls, kind: str, train_captions: Iterable[str], min_count: int = 2) -> "Vocab":
        """Vocabulary of the TRAIN captions.

        word: words seen at least ``min_count`` times; char: every character seen (``min_count`` ignored,
        rare characters are still worth spelling). Ordered by falling count, then alphabetically, so the
        same captions always give the same ids.
        """
        tokenize = TOKENIZERS[_check_kind(kind)]
        counts: Counter[str] = Counter()
        n = 0
        for caption in train_captions:
            counts.update(tokenize(caption))
            n += 1
        if n == 0:
            raise ValueError("cannot build a vocabulary from no training captions")
        threshold = 1 if kind == "char" else min_count
        kept = [tok for tok, c in counts.items() if c >= threshold and tok not in SPECIALS]
        kept.sort(key=lambda tok: (-counts[tok], tok))
        return cls(kind, SPECIALS + kept)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and (self.kind, self.itos) == (other.kind, other.itos)

    def __repr__(self) -> str:
        return f"Vocab(kind={self.kind!r}, size={len(self)})"

    # ---------------------------------------------------------------------------------------- encoding
    def tokenize(self, text: str) -> list[str]:
        """Tokens of ``text`` (word: ``word_tokens``; char: ``list(normalize(text))``)."""
        return TOKENIZERS[self.kind](text)

    def encode(self, text: str, max_len: int) -> list[int]:
        """``[START] + ids[:max_len] + [END]``; tokens outside the vocabulary become UNK."""
        ids = [self.stoi.get(tok, UNK) for tok in self.tokenize(text)[:max_len]]
        return [START, *ids, END]

    def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Encode many captions at once.

        Returns ``(ids, lengths, truncated)``: ids (N, max_len + 2) int64 padded with PAD, lengths (N,)
        counting START and END, and how many captions were longer than ``max_len`` tokens and cut.
        Tokenising is per caption (Python); the id lookup and the padded layout are done in one go.
        """
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        tokens = [self.tokenize(t) for t in texts]
        full = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))  # (N,)
        n_tok = np.minimum(full, max_len)  # (N,) tokens kept per caption
        flat = [tok for toks in tokens for tok in toks[:max_len]]
        get = self.stoi.get
        flat_ids = np.fromiter((get(tok, UNK) for tok in flat), dtype=np.int64, count=len(flat))  # (sum n_tok,)

        n = len(tokens)
        out = np.full((n, max_len + 2), PAD, dtype=np.int64)  # (N, L+2)
        out[:, 0] = START
        rows = np.repeat(np.arange(n), n_tok)  # caption of each kept token
        starts = np.cumsum(n_tok) - n_tok  # offset of each caption in `flat`
        cols = 1 + np.arange(len(flat)) - np.repeat(starts, n_tok)  # position after START
        out[rows, cols] = flat_ids
        out[np.arange(n), n_tok + 1] = END
        truncated = int((full > max_len).sum())
        return torch.from_numpy(out), torch.from_numpy(n_tok + 2), truncated

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of a token-id sequence: stops at END, drops START and PAD; UNK reads ``<unk>``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out: list[str] = []
        for i in ids:
            i = int(i)
            if i == END:
                break
            if i in (START, PAD):
                continue
            if not 0 <= i < len(self.itos):
                raise ValueError(f"token id {i} is outside this {self.kind} vocabulary of size {len(self)}")
            out.append(self.itos[i])
        return _JOINERS[self.kind].join(out)

    # ---------------------------------------------------------------------------------------- saving
    def to_dict(self) -> dict:
        """JSON-able form: ``{"format", "kind", "itos"}``."""
        return {"format": self.FORMAT, "kind": self.kind, "itos": list(self.itos)}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        if not isinstance(d, dict) or not {"kind", "itos"} <= d.keys():
            raise ValueError("a saved vocabulary needs the keys 'kind' and 'itos'")
        if d.get("format", cls.FORMAT) != cls.FORMAT:
            raise ValueError(f"saved vocabulary has format {d['format']}, this code reads format {cls.FORMAT}")
        return cls(d["kind"], d["itos"])

    def save(self, path: Path) -> None:
        """Write JSON atomically (a reader never sees half a file)."""
        atomic_write_text(Path(path), json.dumps(self.to_dict(), ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Vocab":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot load vocabulary: {exc}") from exc
