"""Records: what one stage writes into the study folder and another reads, with its reader and writer, below every
stage (this module imports none: ``tests/test_architecture.py`` checks), so stages read each other's results here
instead of importing each other (issue 30's records layer, begun).

- ``TestSplitRecord`` (``test_split.json``): what the confirm stage knew of the data when it scored the test split,
  the prepared data's ``info`` (the report's provenance) and the first test images with a reference each (the
  report's gallery). Written before the first confirm run, so ``study report`` reads it instead of preparing the
  data just to learn those few facts.
- The confirm results (``confirm/<run>.json``): ``load_confirm`` (the analysis frames), ``per_image_rows``,
  ``confirm_history`` (the per-epoch curves) and ``chosen_epoch`` (which epoch's model was scored, and why).
- The sequential plan (``decide.json`` and the spec) and the level every interval of the report uses.
- ``EXPORT_MANIFEST``, the file an export folder lists its files in, and ``SCORES_KEY``: whether a report's and an
  export's tables hold scores in points; ``missing``, the one test for an absent value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from study.records.files import atomic_write_text

if TYPE_CHECKING:
    from study.data.prepare import PreparedData
    from study.records.paths import StudyPaths
    from study.spec import StudySpec

def missing(value: Any) -> bool:
    """Whether a value read from a record, table or result is absent: ``None``, a float NaN (Python's or numpy's)
    or pandas' ``NA``. The one test for it; ``v == v`` spelt out was in five places and two ``_missing`` helpers."""
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))  # text, lists: values


GALLERY_IMAGES = 6  # test images shown with every arm's caption in the report


class GalleryImage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    reference: str  # the first human caption


class TestSplitRecord(BaseModel):
    """The data facts the report needs, recorded at confirm time (``<study>/test_split.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    info: dict[str, str]
    gallery: list[GalleryImage]

    @classmethod
    def of(cls, data: "PreparedData") -> "TestSplitRecord":
        test = data.images["test"]
        return cls(info={k: str(v) for k, v in data.info.items()},
                   gallery=[GalleryImage(path=str(test.paths[i]), reference=test.references[i][0])
                            for i in range(min(GALLERY_IMAGES, len(test.paths)))])


def test_split_file(paths: "StudyPaths") -> Path:
    return paths.test_split  # not in confirm/, whose every .json is a confirm run


def write_test_split(paths: "StudyPaths", data: "PreparedData") -> TestSplitRecord:
    record = TestSplitRecord.of(data)
    atomic_write_text(test_split_file(paths), record.model_dump_json(indent=2))
    return record


def read_test_split(paths: "StudyPaths") -> TestSplitRecord | None:
    """The record, or None for a study confirmed before it was written (or a damaged one: prepare the data)."""
    path = test_split_file(paths)
    try:
        return TestSplitRecord.model_validate_json(path.read_text())
    except (OSError, ValidationError):
        return None


# ----- the confirm stage's results: <study>/confirm/<run>.json ------------------------------------------------
def per_image_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One confirm result's per-image scores, one row per image: ``method, config_rank, seed, image_id`` and each
    per-image metric (``analysis.metric_table.PER_IMAGE``, NaN where the run has none, e.g. METEOR without Java).
    The one reader of the ``per_image`` block: the verdict, the report and ``Study.per_image`` all use it."""
    from analysis.metric_table import PER_IMAGE

    scores = result["per_image"]
    names = list(dict.fromkeys([*PER_IMAGE, *scores]))
    return [{"method": result["method"], "config_rank": result["config_rank"], "seed": result["seed"],
             "image_id": int(image_id), **{m: scores.get(m, {}).get(image_id, float("nan")) for m in names}}
            for image_id in sorted({k for d in scores.values() for k in d}, key=int)]


def load_confirm(paths: "StudyPaths", test: TestSplitRecord | None = None
                 ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(per_image, runs, gallery) frames for the analysis from the confirm folder (the gallery from ``test``, the
    test split's record; empty without one)."""
    image_rows, run_rows, gallery_rows = [], [], []
    shown = test.gallery if test is not None else []
    for path in paths.confirm_results():
        result = json.loads(path.read_text())
        method, rank, seed = result["method"], result["config_rank"], result["seed"]
        image_rows += per_image_rows(result)
        run_rows.append({"method": method, "config_rank": rank, "seed": seed, "params": result["params"],
                         "train_seconds": result["train_seconds"], "seconds": result.get("seconds", float("nan")),
                         "epochs": result["epochs"], **chosen_epoch(result), "test_images": len(result["captions"]),
                         "distinct_captions": len(set(result["captions"])), **result["scores"]})
        if rank == 1 and seed == 0:
            for i, image in enumerate(shown[:len(result["captions"])]):
                gallery_rows.append({"image_path": image.path, "method": method,
                                     "caption": result["captions"][i], "reference": image.reference})
    return pd.DataFrame(image_rows), pd.DataFrame(run_rows), pd.DataFrame(gallery_rows)


def confirm_history(paths: "StudyPaths") -> pd.DataFrame:
    """One row per (confirm run, epoch): ``run``, ``method``, ``config_rank``, ``seed`` and what the epoch
    reported (validation scores, loss, learning rate, seconds), from each run's result file; for the report's
    "Did training run long enough?" (``analysis.training_length``) and ``study export``'s confirm_history.csv."""
    rows = []
    for path in paths.confirm_results():
        result = json.loads(path.read_text())
        keys = {"run": path.stem, "method": result["method"], "config_rank": result["config_rank"],
                "seed": result["seed"]}
        chosen = chosen_epoch(result)["chosen_epoch"]
        rows += [{**keys, **epoch, "chosen": epoch["epoch"] == chosen} for epoch in result.get("history", [])]
    return pd.DataFrame(rows)


def chosen_epoch(result: dict[str, Any]) -> dict[str, Any]:
    """A confirm result's chosen epoch, by which rule, and why its training stopped (runs from before the rule
    was recorded were scored at their last epoch)."""
    selection = result.get("selection") or {}
    return {"chosen_epoch": selection.get("chosen_epoch", result["epochs"]),
            "selection": selection.get("rule", "last"), "stopped": selection.get("stopped", "schedule end")}


# ----- the sequential plan and the intervals' level: decide.json and the spec ----------------------------------
def sequential_plan(spec: "StudySpec", paths: "StudyPaths", max_seeds: int | None = None):
    """The study's sequential plan (``analysis.sequential``), or None for the fixed 95% design.

    A plan in the spec (``confirm.max_seeds``) was fixed before the first look. Without one, ``study decide``
    starts a plan after the first (95%) look: its error bound adds that look's 5%, and ``decide.json``
    remembers the plan so later reports use the same level."""
    from analysis.sequential import SequentialPlan
    from study.config import ConfigError

    planned = spec.confirm.max_seeds
    if planned is not None:
        if max_seeds is not None and max_seeds > planned:
            raise ConfigError(f"confirm.max_seeds is {planned}: the plan was fixed before the first look, and "
                              f"raising it to {max_seeds} now would void its error bound; edit the spec for a "
                              "new study instead")
        return SequentialPlan(spec.confirm.seeds, max_seeds or planned)
    if max_seeds is None and paths.decide.is_file():
        max_seeds = json.loads(paths.decide.read_text())["max_seeds"]
    if max_seeds is None:
        return None
    return SequentialPlan(spec.confirm.seeds, max_seeds, spent_alpha=0.05)


def report_level(spec: "StudySpec", paths: "StudyPaths") -> float:
    """The intervals' level the report uses: 95%, or the sequential plan's per-look level after ``study decide``."""
    plan = sequential_plan(spec, paths)
    return plan.level if plan else 0.95


# ----- an export folder ---------------------------------------------------------------------------------------
EXPORT_MANIFEST = "export.json"  # in an export folder: the study and the files its export wrote
# The scale of the scores in a report's verdict.csv and an export's tables, recorded under this key in the report's
# provenance.json and the export's manifest: "points" (x100 of pycocoevalcap's 0..1). A report or an export without
# it predates points and holds the 0..1 scale (``analysis.metric_table``'s docstring: one scale everywhere).
SCORES_KEY, SCORES_IN_POINTS = "scores", "points"


def scores_in_points(record: dict[str, Any]) -> bool:
    """Whether a report's provenance or an export's manifest says its scores are in points."""
    return record.get(SCORES_KEY) == SCORES_IN_POINTS
