"""Records: what one stage writes into the study folder and another reads, with its reader and writer, below every
stage (the layer imports none: ``tests/test_architecture.py`` checks), so stages read each other's results here
instead of importing each other, and parse nothing another stage wrote themselves (that test counts where JSON
is parsed above this layer). Each record is a pydantic model, validated on read: a damaged file is a
``RecordError`` naming it and what to do (``run_results.read_record``), never a ``KeyError`` in a report.

- ``TestSplitRecord`` (``test_split.json``): what the confirm stage knew of the data when it scored the test split,
  the prepared data's ``info`` (the report's provenance) and the first test images with a reference each (the
  report's gallery). Written before the first confirm run, so ``study report`` reads it instead of preparing the
  data just to learn those few facts.
- ``ExportManifest`` (``export.json`` in an export folder): the study and the files its export wrote, and
  ``SCORES_KEY``: whether a report's and an export's tables hold scores in points.
- ``SearchTime`` (``search_time.json``): the search's time budget and the seconds it used.
- ``missing``, the one test for an absent value.

The other records have modules of their own here: the runs' results on test sets (``run_results``), the decide
log with the sequential plan and the report's level (``decide_log``), the comparator (``comparing``), the trial
tables (``trial_tables``), the ledger of looks at test splits (``ledger``), the evaluated sets' verdicts
(``verdicts``) and the folder layout itself (``paths``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from study.records.files import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from study.data.prepare import PreparedData
    from study.records.paths import StudyPaths


class SearchTime(BaseModel):
    """``search_time.json``: the search's time budget, summed over every driver of the study (written by
    ``study.tuning.callbacks.SearchTimeBudget``; read by the report's provenance and ``study profile``)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    budget_s: float | None = None
    used_s: float = 0.0  # wall seconds the search has run, over every driver
    spent: bool = False


def read_search_time(path: Path) -> SearchTime:
    """The budget's ledger (nothing used before the search starts)."""
    from study.records.run_results import read_record

    if not Path(path).is_file():
        return SearchTime()
    return read_record(SearchTime, Path(path), "delete it to restart the budget's clock from zero",
                       what="search time ledger")


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


# ----- an export folder ---------------------------------------------------------------------------------------
EXPORT_MANIFEST = "export.json"  # in an export folder: the study and the files its export wrote
# The scale of the scores in a report's verdict.csv and an export's tables, recorded under this key in the report's
# provenance.json and the export's manifest: "points" (x100 of pycocoevalcap's 0..1). A report or an export without
# it predates points and holds the 0..1 scale (``analysis.metric_table``'s docstring: one scale everywhere).
SCORES_KEY, SCORES_IN_POINTS = "scores", "points"


def scores_in_points(record: dict[str, Any]) -> bool:
    """Whether a report's provenance or an export's manifest says its scores are in points."""
    return record.get(SCORES_KEY) == SCORES_IN_POINTS


class ExportManifest(BaseModel):
    """``export.json``: what ``study export`` wrote into an export folder (``--force`` removes those files and only
    those), the spec's folder for ``study reproduce``, and the scale of its scores."""

    model_config = ConfigDict(extra="allow", frozen=True)

    study: str | None = None
    files: list[str] = []
    spec_folder: str | None = None  # relative to the repository that holds the export, e.g. search_spaces
    scores: str | None = None  # "points"; None: an export from before points, on the 0..1 scale

    @property
    def in_points(self) -> bool:
        return self.scores == SCORES_IN_POINTS


def read_export_manifest(export_dir: Path) -> ExportManifest:
    """An export folder's manifest (an empty one for a folder exported before manifests were written)."""
    from study.records.run_results import read_record

    path = Path(export_dir) / EXPORT_MANIFEST
    if not path.is_file():
        return ExportManifest()
    return read_record(ExportManifest, path, "export the study again into a new folder", what="export manifest")


def write_export_manifest(export_dir: Path, manifest: ExportManifest) -> Path:
    return atomic_write_json(Path(export_dir) / EXPORT_MANIFEST, manifest.model_dump(mode="json"), indent=2)
