"""Which column of the trial and history frames names what the study compares.

Studies with arms (``study.arms``) carry an ``arm`` column beside ``inject``: two arms can share an injection
method (the seed's model and Tanti et al.'s init are both ``init``), so tables and figures group by arm. Frames
of older studies, or made by hand, have ``inject`` only.
"""

from __future__ import annotations

import pandas as pd


def group_column(frame: pd.DataFrame) -> str:
    """``arm`` where the frame names arms, else ``inject``."""
    return "arm" if "arm" in frame and frame["arm"].notna().any() else "inject"
