"""Scores that say nothing about the question: a model whose captions do no better on their own images than on
other images' (the image-blind floor), or one that writes empty captions.

Both happen when a model meets images of another domain than it was trained on (a ``shapes`` model on photos):
``study evaluate`` and ``study caption`` warn, naming that likely cause, instead of printing a verdict or an
empty line as if nothing were wrong.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

SHIFTS = 2  # rotations of the captions over the images: the floor is the best of them


def blind_floor(references: Mapping[Hashable, Sequence[str]], captions: Mapping[Hashable, str],
                metric: str = "CIDEr-D") -> float:
    """What the same captions score given to other images: each image's caption scored against the references of
    the image 1 and n/2 places on (fixed rotations, so deterministic), the better of the two. A model that uses
    its image scores well above it; one that ignores the images scores about the same."""
    from study.metrics import score_captions

    keys = list(captions)
    if len(keys) < 2:
        return float("nan")
    best = float("-inf")
    for shift in sorted({1, len(keys) // 2} - {0})[:SHIFTS]:
        rotated = {k: captions[keys[(i + shift) % len(keys)]] for i, k in enumerate(keys)}
        best = max(best, score_captions(references, rotated)[metric])
    return best


def floor_warnings(runs: Mapping[str, dict], references: Mapping[Hashable, Sequence[str]], *, dataset: str,
                   trained_on: str, metric: str = "CIDEr-D") -> list[str]:
    """Warnings for the runs (name -> ``{"captions": {key: text}, "scores": {metric: value}}``) scored on
    ``dataset``: those at or below the image-blind floor, and those that left captions empty."""
    at_floor, empty = [], []
    for name, run in runs.items():
        captions = run["captions"]
        blank = sum(not str(c).strip() for c in captions.values())
        if blank:
            empty.append(f"{name} {blank} of {len(captions)}")
        score, floor = run["scores"].get(metric, float("nan")), blind_floor(references, captions, metric)
        if score == score and floor == floor and score <= floor:
            at_floor.append(f"{name} {100 * score:.1f} against {100 * floor:.1f}")
    cause = (f"the models were most likely trained on another domain ({trained_on}) than {dataset}'s images, "
             f"so a verdict on {dataset} says nothing about the question")
    warnings = []
    if at_floor:
        warnings.append(f"{len(at_floor)} of {len(runs)} models score at or below the image-blind floor on "
                        f"{dataset} ({metric} x100 of their captions on their own images against the same captions "
                        f"given to other images: {', '.join(at_floor)}): {cause}")
    if empty:
        warnings.append(f"{len(empty)} of {len(runs)} models wrote empty captions on {dataset} ({', '.join(empty)}): "
                        f"{cause}")
    return warnings


def caption_warnings(captions: Sequence[str], *, trained_on: str) -> list[str]:
    """``study caption``'s warnings: empty captions, or one caption for every image (blind to them)."""
    warnings = []
    blank = sum(not c.strip() for c in captions)
    cause = (f"the model was trained on {trained_on}; images of another domain are likely outside what it learnt, "
             "so caption them with a model trained on similar images")
    if blank:
        warnings.append(f"{blank} of {len(captions)} captions are empty: {cause}")
    if len(captions) >= 3 and len(set(captions)) == 1 and not blank:
        warnings.append(f"every one of the {len(captions)} images got the same caption ({captions[0]!r}), as a model "
                        f"blind to its images writes: {cause}")
    return warnings


def trained_on(dataset: object) -> str:
    """A short name of a config's training data: ``shapes`` scenes, or a Karpathy JSON's file name."""
    kind = getattr(dataset, "kind", None)
    if kind == "karpathy":
        return f"the photos of {getattr(dataset, 'json_path').name}"
    return "generated shapes scenes" if kind == "shapes" else str(kind or "another dataset")


def evaluation_warnings(folder, dataset: str, *, trained: str, metric: str = "CIDEr-D") -> list[str]:
    """``floor_warnings`` of a ``study evaluate`` folder (``<study>/evaluate/<name>``): its set's references and
    every run's captions and scores there."""
    import json
    from pathlib import Path

    folder = Path(folder)
    references = dict(enumerate(json.loads((folder / "set.json").read_text())["references"]))
    runs = {}
    for path in sorted((folder / "runs").glob("*.json")):
        result = json.loads(path.read_text())
        runs[path.stem] = {"captions": dict(enumerate(result["captions"])), "scores": result["scores"]}
    return floor_warnings(runs, references, dataset=dataset, trained_on=trained, metric=metric)
