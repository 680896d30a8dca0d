"""The verdict's words at several equivalence margins, from one interval: how much the answer rests on the margin.

The interval of ``target - comparator`` does not depend on the margin, so the table is the same bootstrap
resamples judged against each margin: 1, 2 and 3 points of the metric x100 (0.01, 0.02, 0.03 on the 0..1 scale)
and 4% of the comparator's score, plus the study's own margin where it is none of these. The words follow
``analysis.verdict``: "competes" when the whole interval lies above ``-margin``, "does not compete" when it lies
below, else "inconclusive".
"""

from __future__ import annotations

import math

import pandas as pd

COMPETES = "competes"
DOES_NOT_COMPETE = "does not compete"
INCONCLUSIVE = "inconclusive"
NOT_AVAILABLE = "not available"

POINTS = (0.01, 0.02, 0.03)  # 1, 2 and 3 points x100
SHARE = 0.04  # 4% of the comparator's score
COLUMNS = ["margin_label", "margin", "diff", "lo", "hi", "verdict"]


def word(ci: tuple[float, float], margin: float) -> str:
    """The verdict's word for an interval at a margin (``not available`` for a NaN interval)."""
    if any(math.isnan(v) for v in ci):
        return NOT_AVAILABLE
    return COMPETES if ci[0] > -margin else DOES_NOT_COMPETE if ci[1] < -margin else INCONCLUSIVE


def margins(comparator_score: float, study_margin: float | None = None) -> list[tuple[str, float]]:
    """(label, margin on the 0..1 scale) of every row of the table, in order."""
    rows = [(f"{100 * p:g} point{'s' if p != 0.01 else ''}", p) for p in POINTS]
    if not math.isnan(comparator_score):
        rows.append((f"{100 * SHARE:g}% of the comparator ({100 * SHARE * comparator_score:.2f} points)",
                     SHARE * comparator_score))
    if study_margin is not None and not any(math.isclose(study_margin, m, abs_tol=1e-12) for _, m in rows):
        rows.append((f"the study's margin ({100 * study_margin:g} points)", study_margin))
    return rows


def margin_table(diff: float, ci: tuple[float, float], comparator_score: float, study_margin: float | None = None,
                 judge=word) -> pd.DataFrame:
    """One row per margin: ``margin_label, margin, diff, lo, hi, verdict``. ``judge(ci, margin)`` gives the word
    (the pooled verdict passes its own rule, which also weighs whether the sets agree)."""
    rows = [{"margin_label": label, "margin": m, "diff": diff, "lo": ci[0], "hi": ci[1], "verdict": judge(ci, m)}
            for label, m in margins(comparator_score, study_margin)]
    return pd.DataFrame(rows, columns=COLUMNS)


def margin_blocks(table: pd.DataFrame, target: str | None, comparator: str | None, metric: str, level: float,
                  where: str = "") -> list:
    """The report's margin-sensitivity table (``analysis.render`` blocks; ``where``: " on <set>" or " pooled")."""
    from analysis.scores import x100

    if table.empty or table["lo"].isna().all():
        return []
    first = table.iloc[0]
    return [("p", f"The verdict{where} at other equivalence margins: the same {100 * level:.4g}% interval of "
                  f"{target} - {comparator} ({metric} x100: {x100(first['diff'])} [{x100(first['lo'])}, "
                  f"{x100(first['hi'])}]) judged against each margin:"),
            ("table", ["margin", "margin (x100)", "verdict"],
             [[r["margin_label"], x100(r["margin"]), r["verdict"]] for _, r in table.iterrows()]),
            ("p", deciding_margins(first["lo"], first["hi"], target))]


def deciding_margins(lo: float, hi: float, target: str | None) -> str:
    """Where the words change, read off the interval (``word``): "competes" at every margin above ``-lo``, "does
    not compete" at every margin below ``-hi`` (only when the whole interval is below 0), inconclusive between."""
    from analysis.scores import x100

    if lo >= 0:
        return f"Read off the interval: {target} competes at every margin (the whole interval is above 0)."
    if hi >= 0:
        return (f"Read off the interval: {target} competes at every margin above {x100(-lo)} points and is "
                "inconclusive at every smaller one (the interval includes 0, so no margin makes it not compete).")
    return (f"Read off the interval: {target} competes at every margin above {x100(-lo)} points, does not compete "
            f"at every margin below {x100(-hi)} points, and is inconclusive in between.")
