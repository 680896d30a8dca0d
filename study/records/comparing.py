"""What a study's verdict compares, and with which bootstrap settings: read by every place a verdict is computed.

* ``comparator.json`` in the study folder (``StudyPaths.comparator``): the arm the target is compared with on
  every test set, fixed before any test split is scored (the best other arm on the search's validation metric):
  ``{"comparator": "<arm>", "chosen_by": "...", "values": {...}}``. Without it the verdict falls back to the best
  competitor on the test means (and the pooled verdict to the best on the primary set), and says so.
* the name of the study's own test split (``test_set_name``): it keys that set's image resample
  (``analysis.bootstrap``), so the verdict, its pairwise table and the pooled row draw the same resamples.
* ``verdict_settings``: everything ``study verify`` needs to recompute every interval from an export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis.verdict import PRIMARY
from study.records.files import atomic_write_json

if TYPE_CHECKING:
    from study.records.paths import StudyPaths
    from study.spec import StudySpec

N_BOOT = 2000  # the bootstrap's resamples and seed, the same for every verdict a study prints
BOOT_SEED = 0


class ComparatorError(ValueError):
    """``comparator.json`` is damaged; the message names the file and what it should hold."""


def read_comparator(paths: "StudyPaths") -> str | None:
    """The arm fixed as the comparator before any test split was scored, or None when the study fixed none."""
    record = read_comparator_record(paths)
    return None if record is None else record["comparator"]


def read_comparator_record(paths: "StudyPaths") -> dict[str, Any] | None:
    path = paths.comparator
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("comparator"), str):
            raise TypeError("no string 'comparator'")
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise ComparatorError(f"{path} is damaged ({exc}): it should be a JSON object such as "
                              '{"comparator": "attention", "chosen_by": "...", "values": {...}}') from None
    return record


def write_comparator(paths: "StudyPaths", comparator: str, chosen_by: str, values: dict[str, float]) -> Path:
    """Record the comparator (write-then-rename); done once, before the confirm stage scores the test split."""
    return atomic_write_json(paths.comparator, {"comparator": comparator, "chosen_by": chosen_by,
                                                "values": values}, indent=2)


def test_set_name(spec: "StudySpec") -> str:
    """How the report names the study's own test split among the sets (no file is read)."""
    dataset = spec.dataset
    base = "shapes" if dataset.kind == "shapes" else Path(dataset.json_path).stem.removeprefix("dataset_")
    return f"{base} test (the study's)"


def verdict_settings(spec: "StudySpec", paths: "StudyPaths", *, roles: dict[str, str], level: float,
                     sets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What ``study verify`` needs to recompute the report's intervals and words from an export's files:
    the bootstrap's settings, the roles, the comparator (and how it was chosen) and the sets (name ->
    ``{"file": ..., "dataset": ...}``, the study's own test split first)."""
    record = read_comparator_record(paths)
    return {"metric": PRIMARY, "n_boot": N_BOOT, "seed": BOOT_SEED, "level": level,
            "margin": spec.confirm.equivalence_margin, "roles": roles,
            "comparator": None if record is None else record["comparator"],
            "comparator_chosen_by": None if record is None else record.get("chosen_by"),
            "primary": test_set_name(spec), "sets": sets}
