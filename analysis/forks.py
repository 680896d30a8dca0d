"""The forking paths: earlier studies that scored the same test split, as the report lists them.

Every look at a test split under a new protocol is one more chance to find what one hoped for; the test-split
ledger (``study.records.ledger``) keeps each look, and this section says how many there were before this study's.
Pure: the ledger's rows in (differences on the 0..1 scale), ``analysis.render`` blocks out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd

from analysis.render import Block
from analysis.scores import x100


def _look(row: pd.Series) -> str:
    interval = ("no interval" if any(math.isnan(float(row[k])) for k in ("lo", "hi"))
                else f"[{x100(float(row['lo']))}, {x100(float(row['hi']))}]")
    level = "" if math.isnan(float(row["level"])) else f" at {100 * float(row['level']):.4g}%"
    diff = "n/a" if math.isnan(float(row["diff"])) else x100(float(row["diff"]))
    date = str(row["date"])[:10]
    source = f"; {row['source']}" if row["source"] and row["source"] != "study report" else ""
    return (f"{row['study']} ({date}; {row['protocol']}): {row['target']} - {row['comparator']} {diff} {interval}"
            f"{level}, {row['verdict'] or 'no verdict recorded'}{source}")


def fork_blocks(earlier: Mapping[str, pd.DataFrame]) -> list[Block]:
    """One paragraph per test set (``{set name: the ledger's earlier rows for it}``), each earlier look listed."""
    blocks: list[Block] = [("h2", "Earlier looks at these test splits")]
    for name, rows in earlier.items():
        if rows.empty:
            blocks.append(("p", f"{name}: no earlier study in the ledger scored this test split."))
            continue
        blocks += [("p", f"{name}: this test split was consulted {len(rows)} time{'s' if len(rows) != 1 else ''} "
                         "before, under other studies or protocols (the test-split ledger; differences x100):"),
                   ("ul", [_look(r) for _, r in rows.iterrows()])]
    return blocks
