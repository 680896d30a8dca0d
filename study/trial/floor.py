"""Scores that say nothing about the question: a model whose captions do no better on their own images than on
other images' (the image-blind floor), or one that writes empty captions.

Both happen when a model meets images of another domain than it was trained on (a ``shapes`` model on photos):
``study evaluate`` and ``study caption`` warn, naming that likely cause, instead of printing a verdict or an
empty line as if nothing were wrong.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

SHIFTS = 2  # rotations of the captions over the images: the floor is the best of them
CLEAR = 2.0  # standard errors by which a model's own-image advantage over the floor must clear zero


def _rotations(references: Mapping[Hashable, Sequence[str]], captions: Mapping[Hashable, str],
               metric: str) -> tuple[float, dict[Hashable, float]]:
    """The best rotation's corpus score and its per-image scores (empty where ``metric`` has none per image)."""
    from study.trial.metrics import score_captions_per_image

    keys = list(captions)
    best, per_image = float("-inf"), {}
    for shift in sorted({1, len(keys) // 2} - {0})[:SHIFTS]:
        rotated = {k: captions[keys[(i + shift) % len(keys)]] for i, k in enumerate(keys)}
        scores, each = score_captions_per_image(references, rotated, full=metric in ("METEOR", "ROUGE-L"))
        if scores[metric] > best:
            best, per_image = scores[metric], each.get(metric, {})
    return best, per_image


def blind_floor(references: Mapping[Hashable, Sequence[str]], captions: Mapping[Hashable, str],
                metric: str = "CIDEr-D") -> float:
    """What the same captions score given to other images: each image's caption scored against the references of
    the image 1 and n/2 places on (fixed rotations, so deterministic), the better of the two. A model that uses
    its image scores well above it; one that ignores the images scores about the same."""
    return _rotations(references, captions, metric)[0] if len(captions) >= 2 else float("nan")


def image_gain(references: Mapping[Hashable, Sequence[str]], captions: Mapping[Hashable, str],
               metric: str = "CIDEr-D") -> tuple[float, float, float]:
    """(floor, gain, se): the image-blind floor, and the mean over images of each caption's score on its own
    image minus on the floor's other image, with that mean's standard error (NaN where it cannot be had)."""
    import numpy as np

    from study.trial.metrics import score_captions_per_image

    if len(captions) < 2:
        return float("nan"), float("nan"), float("nan")
    floor, rotated = _rotations(references, captions, metric)
    own = score_captions_per_image(references, captions, full=metric in ("METEOR", "ROUGE-L"))[1].get(metric, {})
    if not rotated or not own:
        return floor, float("nan"), float("nan")
    diff = np.array([own[k] - rotated[k] for k in captions])
    return floor, float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))


def _at_floor(name: str, run: dict, references, metric: str, blind_arm: float | None) -> str | None:
    """Why ``run`` says nothing about the images, or None: no better than its captions given to other images (by
    less than ``CLEAR`` standard errors, so a lucky margin on a few photos counts as none), or at or below the
    study's image-blind arm on the same set."""
    score = run["scores"].get(metric, float("nan"))
    if score != score:
        return None
    floor, gain, se = image_gain(references, run["captions"], metric)
    why = []
    if floor == floor and (score <= floor or (gain == gain and gain <= CLEAR * se)):
        why.append(f"the image adds {100 * gain:+.1f} ± {100 * CLEAR * se:.1f}" if gain == gain else "")
    if blind_arm is not None and score <= blind_arm:
        why.append(f"the image-blind arm scores {100 * blind_arm:.1f}")
    if not why:
        return None
    return f"{name} {100 * score:.1f} against {100 * floor:.1f}" + "".join(f"; {w}" for w in why if w)


def floor_warnings(runs: Mapping[str, dict], references: Mapping[Hashable, Sequence[str]], *, dataset: str,
                   trained_on: str, metric: str = "CIDEr-D", roles: Mapping[str, str] | None = None) -> list[str]:
    """Warnings for the runs (name -> ``{"captions": {key: text}, "scores": {metric: value}}``, with ``method``
    where ``roles`` name each arm's role) scored on ``dataset``: those whose own images add nothing measurable to
    their score (see ``_at_floor``), and those that left captions empty. Runs of an image-blind arm (role
    ``floor``) are not judged: their mean score is the study's own floor on the set."""
    roles = roles or {}
    blind = [run["scores"].get(metric, float("nan")) for run in runs.values()
             if roles.get(run.get("method", "")) == "floor"]
    blind = [b for b in blind if b == b]
    blind_arm = sum(blind) / len(blind) if blind else None
    judged = {name: run for name, run in runs.items() if roles.get(run.get("method", "")) != "floor"}
    at_floor, empty = [], []
    for name, run in judged.items():
        captions = run["captions"]
        blank = sum(not str(c).strip() for c in captions.values())
        if blank:
            empty.append(f"{name} {blank} of {len(captions)}")
        if (why := _at_floor(name, run, references, metric, blind_arm)) is not None:
            at_floor.append(why)
    cause = (f"the models were most likely trained on another domain ({trained_on}) than {dataset}'s images, "
             f"so a verdict on {dataset} says nothing about the question")
    warnings = []
    if at_floor:
        warnings.append(f"{len(at_floor)} of {len(judged)} models score at or below the image-blind floor on "
                        f"{dataset} ({metric} x100 of their captions on their own images against the same captions "
                        f"given to other images: {', '.join(at_floor)}): {cause}")
    if empty:
        warnings.append(f"{len(empty)} of {len(judged)} models wrote empty captions on {dataset} "
                        f"({', '.join(empty)}): {cause}")
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


def evaluation_warnings(folder, dataset: str, *, trained: str, metric: str = "CIDEr-D",
                        roles: Mapping[str, str] | None = None) -> list[str]:
    """``floor_warnings`` of a ``study evaluate`` folder (``<study>/evaluate/<name>``): its set's references and
    every run's captions and scores there; ``roles``: the study's arms' (its image-blind arm the floor too)."""
    from pathlib import Path

    from study.records.run_results import read_evaluation_result
    from study.records.verdicts import SET_FILE, read_set

    folder = Path(folder)
    references = dict(enumerate(read_set(folder / SET_FILE).references))
    runs = {}
    for path in sorted((folder / "runs").glob("*.json")):
        result = read_evaluation_result(path)
        runs[path.stem] = {"captions": dict(enumerate(result.captions)), "scores": result.scores,
                           "method": result.method}
    return floor_warnings(runs, references, dataset=dataset, trained_on=trained, metric=metric, roles=roles)
