"""Time the per-epoch metric path against the full coco-caption suite on real Flickr8k captions.

Each hypothesis is one human caption of an image scored against that image's other four captions. 500 = the
first caption of 500 images; 4955 = every caption of every image in turn (keys (image, caption)).
Fast path timed cold (tokenizer cache empty, the first epoch) and warm (later epochs: references cached).

    python benchmarks/bench_metrics.py [--data ../shared/data/flickr8k-1k]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

from study.trial.metrics import find_java, score_captions
from study.trial.ptb import ptb_tokenize


def held_out_sets(captions: list[list[str]]) -> dict[int, tuple[dict, dict]]:
    small = ({i: caps[1:] for i, caps in enumerate(captions[:500])},
             {i: caps[0] for i, caps in enumerate(captions[:500])})
    refs, hyps = {}, {}
    for i, caps in enumerate(captions):
        for j, caption in enumerate(caps):
            refs[(i, j)] = caps[:j] + caps[j + 1:]
            hyps[(i, j)] = caption
    return {500: small, len(hyps): (refs, hyps)}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/flickr8k-1k")
    args = parser.parse_args()
    data = json.loads((args.data / "dataset_flickr8k.json").read_text())
    captions = [[s["raw"] for s in image["sentences"]] for image in data["images"]]
    print(f"java: {find_java()}")
    print(f"{'hyps':>6} {'fast cold s':>11} {'fast warm s':>11} {'full s':>8}  BLEU-4 fast/full   CIDEr-D fast/full"
          f"   METEOR  ROUGE-L")
    for n, (refs, hyps) in held_out_sets(captions).items():
        ptb_tokenize.cache_clear()
        fast, cold = timed(lambda: score_captions(refs, hyps))
        _, warm = timed(lambda: score_captions(refs, hyps))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            full, full_s = timed(lambda: score_captions(refs, hyps, full=True))
        print(f"{n:>6} {cold:>11.2f} {warm:>11.2f} {full_s:>8.2f}  {fast['BLEU-4']:.4f}/{full['BLEU-4']:.4f}"
              f"   {fast['CIDEr-D']:.4f}/{full['CIDEr-D']:.4f}   {full['METEOR']:.4f}  {full['ROUGE-L']:.4f}")


if __name__ == "__main__":
    main()
