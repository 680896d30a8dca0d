"""Word and character vocabularies: normalisation, ids, round trips, truncation, saving."""

from __future__ import annotations

import json

import pytest
import torch

from study.data.tokens import END, PAD, START, UNK, Vocab, normalize, word_tokens

TRAIN = [
    "A dog runs on the grass.",
    "A black dog runs!",
    "The dog's ball is RED",
    "a cat sleeps",
]


def test_normalize_and_word_tokens():
    assert normalize("  A Dog's ball,  RED!  ") == "a dog's ball red"
    assert normalize("t-shirt_and\tjeans.") == "t shirt and jeans"
    assert normalize("Café 2 cats") == "café 2 cats"
    assert word_tokens("A black dog runs!") == ["a", "black", "dog", "runs"]


def test_word_vocab_counts_min_count_and_order():
    vocab = Vocab.build("word", TRAIN, min_count=2)
    # counts: a 3, dog 2, runs 2, the 2; everything else once. Ordered by count, then alphabetically.
    assert vocab.itos == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs", "the"]
    assert (PAD, START, END, UNK) == (0, 1, 2, 3) and len(vocab) == 8
    assert len(Vocab.build("word", TRAIN, min_count=1)) == 4 + 13
    assert Vocab.build("word", list(reversed(TRAIN))) == vocab  # order of captions does not matter


def test_char_vocab_has_every_character_including_space():
    vocab = Vocab.build("char", TRAIN, min_count=50)  # min_count ignored for characters
    chars = set("".join(normalize(t) for t in TRAIN))
    assert set(vocab.itos[4:]) == chars and " " in chars and "'" in chars
    assert vocab.tokenize("Hi, yo") == ["h", "i", " ", "y", "o"]


@pytest.mark.parametrize("kind", ["word", "char"])
def test_round_trip(kind):
    vocab = Vocab.build(kind, TRAIN, min_count=1)
    for text in TRAIN:
        ids = vocab.encode(text, max_len=100)
        assert ids[0] == START and ids[-1] == END and UNK not in ids
        expected = " ".join(word_tokens(text)) if kind == "word" else normalize(text)
        assert vocab.decode(ids) == expected
        assert vocab.decode(torch.tensor(ids + [PAD, PAD])) == expected


def test_unknown_tokens_truncation_and_decode_rules():
    vocab = Vocab.build("word", TRAIN, min_count=2)
    ids = vocab.encode("a dog chases a zebra", max_len=10)
    assert ids == [START, 4, 5, UNK, 4, UNK, END]
    assert vocab.decode(ids) == "a dog <unk> a <unk>"
    assert vocab.encode("a dog runs a dog", max_len=3) == [START, 4, 5, 6, END]
    # decode stops at the first END and skips START/PAD anywhere before it
    assert vocab.decode([START, 4, PAD, 5, END, 6, 6]) == "a dog"
    with pytest.raises(ValueError, match="outside this word vocabulary of size 8"):
        vocab.decode([START, 99])
    chars = Vocab.build("char", ["ab"])
    assert chars.decode(chars.encode("abz", 10)) == "ab<unk>"


@pytest.mark.parametrize("kind", ["word", "char"])
def test_encode_batch_matches_encode_and_counts_truncation(kind):
    vocab = Vocab.build(kind, TRAIN, min_count=1)
    texts = TRAIN + ["", "dog dog dog dog dog dog dog dog dog dog dog dog dog dog dog dog dog dog dog dog"]
    max_len = 6
    ids, lengths, truncated = vocab.encode_batch(texts, max_len)
    assert ids.shape == (len(texts), max_len + 2) and ids.dtype == torch.int64 and lengths.dtype == torch.int64
    tokens = [vocab.tokenize(t) for t in texts]
    assert truncated == sum(len(t) > max_len for t in tokens) == {"word": 1, "char": 5}[kind]
    for row, n, text in zip(ids.tolist(), lengths.tolist(), texts):
        single = vocab.encode(text, max_len)
        assert n == len(single) and row[:n] == single and set(row[n:]) <= {PAD}
    assert ids[len(TRAIN)].tolist()[:3] == [START, END, PAD]  # the empty caption
    with pytest.raises(ValueError):
        vocab.encode_batch(texts, 0)


def test_save_load_and_errors(tmp_path):
    for kind in ("word", "char"):
        vocab = Vocab.build(kind, TRAIN + ["naïve café"], min_count=1)
        json.dumps(vocab.to_dict())  # JSON-able
        assert Vocab.from_dict(vocab.to_dict()) == vocab
        vocab.save(tmp_path / f"{kind}.json")
        loaded = Vocab.load(tmp_path / f"{kind}.json")
        assert loaded == vocab and loaded.kind == kind and loaded.stoi == vocab.stoi
    with pytest.raises(ValueError, match=r"unknown token kind 'bpe'; valid kinds: \['char', 'word'\]"):
        Vocab.build("bpe", TRAIN)
    with pytest.raises(ValueError, match="no training captions"):
        Vocab.build("word", [])
    with pytest.raises(ValueError, match="must start with"):
        Vocab("word", ["a", "b"])
    (tmp_path / "bad.json").write_text('{"kind": "word"}')
    with pytest.raises(ValueError, match="bad.json: cannot load vocabulary"):
        Vocab.load(tmp_path / "bad.json")
