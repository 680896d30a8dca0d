"""Records: what one stage writes into the study folder and another reads, as typed models beside their reader and
writer (the start of issue 30's records layer).

``TestSplitRecord`` is what the confirm stage knew of the data when it scored the test split: the prepared data's
``info`` (dataset, fingerprint, encoder, feature cache: the report's provenance) and the first test images with a
reference each (the report's gallery). Written before the first confirm run, so ``study report`` reads it instead
of preparing the data (walking the feature cache, tokenising every caption) just to learn those few facts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from study.files import atomic_write_text

if TYPE_CHECKING:
    from study.data.prepare import PreparedData
    from study.paths import StudyPaths

def missing(value: Any) -> bool:
    """Whether a value read from a record, table or result is absent: ``None``, a float NaN (Python's or numpy's)
    or pandas' ``NA``. The one test for it; ``v == v`` spelt out was in five places and two ``_missing`` helpers."""
    if value is None or type(value).__name__ in ("NAType", "NaTType"):
        return True
    try:
        return math.isnan(value)  # Python's and numpy's floats (ints are never NaN)
    except TypeError:
        return False  # text, lists and the like are values


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
