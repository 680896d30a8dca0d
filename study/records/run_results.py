"""A trained model's result on a test set, as the stages write it and every reader reads it: typed records.

    <study>/confirm/<run>.json                 ConfirmResult: the confirm stage's run (``study.stages.confirm``)
    <study>/evaluate/<set>/runs/<run>.json     EvaluationResult: that run's model on another set (``study evaluate``)

Both hold the same scores block (``ScoredRun``): the run's identity (arm, configuration rank, seed), its corpus
scores, its captions in image order and its per-image scores, from which every verdict and interval is
recomputed. The readers here are the only code that parses these files, so a field renamed or added is changed
in one place, and a damaged file is refused with its path (``RecordError``) instead of a ``KeyError`` deep in a
report. The files stay plain JSON on pycocoevalcap's 0..1 scale (``analysis.metric_table``): studies written
before these models read unchanged, and fields a newer version adds are kept (``extra="allow"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from study.records.files import atomic_write_json

if TYPE_CHECKING:
    from study.records import TestSplitRecord
    from study.records.paths import StudyPaths


Record = TypeVar("Record", bound=BaseModel)


class RecordError(ValueError):
    """A record in the study folder cannot be read: the message names the file, what is wrong and what to do."""


class Selection(BaseModel):
    """Which epoch's model a run was scored with, by which rule, and why its training stopped."""

    model_config = ConfigDict(extra="allow", frozen=True)

    chosen_epoch: int
    rule: str = "last"
    stopped: str = "schedule end"


class ScoredRun(BaseModel):
    """One trained model's scores on one test set: the block every verdict reads."""

    model_config = ConfigDict(extra="allow", frozen=True)

    method: str
    config_rank: int
    seed: int  # the seed index k of the run's name (-s<k>); torch was seeded with the config's seed
    scores: dict[str, float | None]  # corpus scores, 0..1 (NaN or None: not computed, e.g. METEOR without Java)
    captions: list[str]  # in the split's image order
    per_image: dict[str, dict[str, float | None]]  # metric -> image index (as text, JSON's keys) -> score
    params: int | None = None
    train_seconds: float | None = None
    epochs: int | None = None  # epochs trained
    seconds: float | None = None  # the whole run: training (or loading) plus scoring

    def per_image_rows(self) -> list[dict[str, Any]]:
        """One row per image: ``method, config_rank, seed, image_id`` and each per-image metric
        (``analysis.metric_table.PER_IMAGE``, NaN where the run has none, e.g. METEOR without Java)."""
        from analysis.metric_table import PER_IMAGE

        names = list(dict.fromkeys([*PER_IMAGE, *self.per_image]))
        image_ids = sorted({k for by_image in self.per_image.values() for k in by_image}, key=int)
        return [{**self.identity(), "image_id": int(i), **{m: _number(self.per_image.get(m, {}).get(i)) for m in names}}
                for i in image_ids]

    def identity(self) -> dict[str, Any]:
        """``method, config_rank, seed``: which run this is (the keys every frame joins on)."""
        return {"method": self.method, "config_rank": self.config_rank, "seed": self.seed}


def _number(value: float | None) -> float:
    return float("nan") if value is None else value


class ConfirmResult(ScoredRun):
    """A confirm run: the search's configuration retrained with one seed and scored on the study's test split."""

    config: dict[str, Any]  # the TrialConfig it trained under, as JSON (without the dataset)
    history: list[dict[str, Any]] = []  # one record per epoch: validation scores, loss, lr, seconds
    precision: str | None = None  # the training precision auto resolved to
    selection: Selection | None = None  # None: written before the rule was recorded, scored at its last epoch
    started_ms: int | None = None  # its real span, for the wall-time provenance and MLflow's duration
    ended_ms: int | None = None

    @property
    def chosen(self) -> Selection:
        """The chosen epoch (a run from before the rule was recorded was scored at its last one)."""
        return self.selection or Selection(chosen_epoch=self.epochs or len(self.history))

    def chosen_columns(self) -> dict[str, Any]:
        """``chosen_epoch, selection, stopped``: the frames' columns for which epoch's model was scored, and why
        training stopped."""
        chosen = self.chosen
        return {"chosen_epoch": chosen.chosen_epoch, "selection": chosen.rule, "stopped": chosen.stopped}


class EvaluationResult(ScoredRun):
    """A confirm run's model scored on a set ``study evaluate`` read, with what identifies that set and model."""

    run: str
    dataset: str  # the set's name
    split: str | None = None
    dataset_fingerprint: str  # the split's: a result of another version of the set is scored again
    checkpoint_sha256: str  # the model's: a retrained run is scored again
    beam_size: int | None = None
    length_penalty: float | None = None
    decode_seconds: float | None = None
    metric_seconds: float | None = None


def read_record(model: type[Record], path: Path, remedy: str, what: str | None = None) -> Record:
    """``path`` parsed as ``model``; a file that is not one (torn JSON, a field missing or of the wrong type) is a
    ``RecordError`` naming the file, the first lines of what is wrong, and ``remedy``."""
    try:
        return model.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as err:  # JSONDecodeError is a ValueError
        lines = str(err).splitlines()[:3]  # pydantic: "1 validation error for X", the field, what is wrong
        raise RecordError(f"{path} is not a readable {what or model.__name__} ({'; '.join(lines)}); "
                          f"{remedy}") from None


def read_confirm_result(path: Path) -> ConfirmResult:
    return read_record(ConfirmResult, path, "move it aside and `study confirm` trains that run again")


def read_confirm_results(paths: "StudyPaths") -> dict[str, ConfirmResult]:
    """Every finished confirm run, by name (``<method>-r<k>-s<seed>``), in name order."""
    return {path.stem: read_confirm_result(path) for path in paths.confirm_results()}


def write_confirm_result(paths: "StudyPaths", name: str, result: ConfirmResult) -> Path:
    return atomic_write_json(paths.confirm_result(name), result.model_dump(mode="python"))


def read_evaluation_result(path: Path) -> EvaluationResult:
    return read_record(EvaluationResult, path, "move it aside and `study evaluate` scores that run again")


def write_evaluation_result(path: Path, result: EvaluationResult) -> Path:
    return atomic_write_json(path, result.model_dump(mode="python"))


# ----- the frames the analysis reads, from the confirm folder --------------------------------------------------
def load_confirm(paths: "StudyPaths", test: "TestSplitRecord | None" = None
                 ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(per_image, runs, gallery) frames for the analysis from the confirm folder (the gallery from ``test``, the
    test split's record; empty without one)."""
    image_rows, run_rows, gallery_rows = [], [], []
    shown = test.gallery if test is not None else []
    for result in read_confirm_results(paths).values():
        image_rows += result.per_image_rows()
        run_rows.append({**result.identity(), "params": result.params, "train_seconds": result.train_seconds,
                         "seconds": _number(result.seconds), "epochs": result.epochs, **result.chosen_columns(),
                         "test_images": len(result.captions), "distinct_captions": len(set(result.captions)),
                         **result.scores})
        if result.config_rank == 1 and result.seed == 0:
            gallery_rows += [{"image_path": image.path, "method": result.method, "caption": caption,
                              "reference": image.reference} for image, caption in zip(shown, result.captions)]
    return pd.DataFrame(image_rows), pd.DataFrame(run_rows), pd.DataFrame(gallery_rows)


def confirm_history(paths: "StudyPaths") -> pd.DataFrame:
    """One row per (confirm run, epoch): ``run``, ``method``, ``config_rank``, ``seed`` and what the epoch
    reported (validation scores, loss, learning rate, seconds), from each run's result file; for the report's
    "Did training run long enough?" (``analysis.training_length``) and ``study export``'s confirm_history.csv."""
    rows = []
    for name, result in read_confirm_results(paths).items():
        keys = {"run": name, **result.identity()}
        chosen = result.chosen.chosen_epoch
        rows += [{**keys, **epoch, "chosen": epoch["epoch"] == chosen} for epoch in result.history]
    return pd.DataFrame(rows)
