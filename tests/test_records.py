"""The records layer's shared helpers (study/records.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from study.records import missing


def test_missing_is_true_for_every_absent_value_and_false_for_every_value():
    # What tables, Tune results and JSON records hold for "no value": the five NaN tests it replaced each knew
    # only some of these (pandas' NA slipped past `v == v`, numpy's NaN past `is None`).
    for absent in (None, float("nan"), np.float32("nan"), np.float64("nan"), pd.NA, pd.NaT):
        assert missing(absent), absent
    for value in (0, 0.0, 1, 0.5, -1e-30, True, False, "", "nan?", [float("nan")], np.array([1.0, 2.0]), {}):
        assert not missing(value), value
