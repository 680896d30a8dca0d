"""``study decide``'s log (``<study>/decide.json``), the sequential plan it fixes, and the level every interval of
the report uses: the one place the "95% unless a sequential plan" rule is written.

    {"max_seeds": 6, "plan": "sequential plan: up to 6 seeds per method, ...",
     "looks": [{"seeds": {"seed": 3, "par": 3}, "best_other": "par", "diff": -0.023, "ci": [-0.045, 0.001],
                "level": 0.9875, "verdict": "inconclusive"}, ...]}

Differences and intervals stay on pycocoevalcap's 0..1 scale, as every record of a study does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from study.records.files import atomic_write_json
from study.records.run_results import read_record

if TYPE_CHECKING:
    from analysis.sequential import SequentialPlan
    from study.records.paths import StudyPaths
    from study.spec import StudySpec


class Look(BaseModel):
    """One look of ``study decide``: the seeds each compared arm had, and the verdict at the plan's level."""

    model_config = ConfigDict(extra="allow", frozen=True)

    seeds: dict[str, int]  # arm -> seeds in the verdict (the target and its comparator)
    best_other: str  # the comparator
    diff: float  # target - comparator, 0..1
    ci: tuple[float, float]
    level: float
    verdict: str


class DecideLog(BaseModel):
    """``decide.json``: the plan ``study decide`` fixed at its first look, and every look since."""

    model_config = ConfigDict(extra="allow", frozen=True)

    max_seeds: int
    plan: str  # the plan in words (``SequentialPlan.describe``)
    looks: list[Look] = []


def read_decide_log(paths: "StudyPaths") -> DecideLog | None:
    """The log, or None before ``study decide`` first looked."""
    if not paths.decide.is_file():
        return None
    return read_record(DecideLog, paths.decide, "it fixes the sequential plan's level: restore it from a backup "
                       "rather than delete it", what="decide log")


def write_decide_log(paths: "StudyPaths", log: DecideLog) -> None:
    atomic_write_json(paths.decide, log.model_dump(mode="json"))


def sequential_plan(spec: "StudySpec", paths: "StudyPaths", max_seeds: int | None = None) -> "SequentialPlan | None":
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
    if max_seeds is None:
        log = read_decide_log(paths)
        max_seeds = log.max_seeds if log is not None else None
    if max_seeds is None:
        return None
    return SequentialPlan(spec.confirm.seeds, max_seeds, spent_alpha=0.05)


def report_level(spec: "StudySpec", paths: "StudyPaths") -> float:
    """The intervals' level the report uses: 95%, or the sequential plan's per-look level after ``study decide``."""
    return plan_level(sequential_plan(spec, paths))


def plan_level(plan: "SequentialPlan | None") -> float:
    """The level of a plan's every look, 95% without one (the fixed design)."""
    return plan.level if plan else 0.95
