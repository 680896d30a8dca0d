"""The types a reader of a study's frames expects, per column (``study.load(...)``'s frames and the exports).

Kept apart from ``study.records.frames`` so every module that builds a frame for a reader (``study.records.frames``,
``study.records.verdicts``) types it the same way without importing the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from study.spec import StudySpec

# Columns that count things: whole numbers, <NA> where missing.
_COUNTS = {"epoch", "epochs", "best_epoch", "config_rank", "seed", "torch_seed", "params", "image_id", "images",
           "seeds", "test_images", "distinct_captions"}


def with_reader_types(frame: pd.DataFrame, spec: "StudySpec | None" = None) -> pd.DataFrame:
    """Each column in the type a reader expects: a trial config field in its field's type (``lr`` and
    ``weight_decay`` float even when every value is whole, ``layers`` Int64, ``seed_h`` boolean, ``cell`` string),
    counts as Int64, other numbers as floats, names as strings; missing values as <NA>. With ``spec``, a
    conditional parameter is <NA> where its ``when:`` does not hold (it was never searched there)."""
    from study.config import TrialConfig

    frame = frame.copy()
    if spec is not None:
        for name, param in spec.space.items():
            if param.when and name in frame:
                active = frame.apply(lambda row: param.matches(row.to_dict()), axis=1) if len(frame) else []
                frame[name] = frame[name].where(pd.Series(active, index=frame.index, dtype=bool), None)
    for col in frame.columns:
        kind = _field_kind(TrialConfig.model_fields[col].annotation) if col in TrialConfig.model_fields else None
        values = frame[col]
        if kind is None and col in _COUNTS:
            kind = int
        if kind is None:
            converted = pd.to_numeric(values, errors="coerce") if values.dtype == object else values
            if values.dtype == object and converted.notna().sum() == values.notna().sum() and values.notna().any():
                values = converted
            elif values.dtype == object:
                values = values.astype("string")
        elif kind is bool:
            values = values.astype("boolean")
        elif kind is int:
            values = pd.to_numeric(values, errors="coerce").round().astype("Int64")
        elif kind is float:
            values = pd.to_numeric(values, errors="coerce").astype("Float64")
        else:
            values = values.astype("string")
        frame[col] = values
    return frame


def _field_kind(annotation) -> type | None:
    """bool, int, float or str for a trial config field's annotation (``int | None`` is int, a Literal str)."""
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return str
    if args and typing.get_origin(annotation) is not typing.Literal:
        return _field_kind(args[0])
    return annotation if annotation in (bool, int, float, str) else None
