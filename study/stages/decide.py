"""``study decide``: more seeds until the verdict is decided, each look judged by the sequential plan.

``add_seeds_until_decided`` (``study decide``) buys certainty when the verdict is inconclusive: one more seed
at a time for the target and its comparator, each look at the sequential plan's level (``analysis.sequential``;
the plan itself is a record, ``study.records.decide_log``), until the verdict is conclusive or the seed or
time budget ends; the looks go to ``decide.json``. The report's sentence on what decided it, or what would,
is ``study.stages.report.decision_note``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from analysis.metric_table import format_metric
from study.records.decide_log import DecideLog, Look, read_decide_log, sequential_plan, write_decide_log
from study.records.run_results import load_confirm

if TYPE_CHECKING:
    from study.context import StudyContext


def _decided_already(ctx: "StudyContext", compare: dict, console: Any) -> bool:
    """Whether the fixed-design (95%) verdict is decided already (then ``study decide`` adds nothing, and says so)."""
    from analysis.verdict import INCONCLUSIVE, compute_verdict

    fixed = compute_verdict(*load_confirm(ctx.paths)[:2], **compare)
    if fixed.verdict == INCONCLUSIVE or fixed.best_other is None:
        return False
    if console is not None:
        diff, low, high = (format_metric(fixed.metric, v) for v in (fixed.diff, *fixed.ci))
        console.print(f"study {ctx.spec.name} is already decided at the fixed 95% level: {fixed.verdict} "
                      f"({fixed.target} - {fixed.best_other} = {diff} [{low}, {high}]); nothing to add. "
                      "`study decide --stricter` re-judges it under a sequential plan, whose stricter level "
                      "may call it inconclusive and train more seeds.", highlight=False)
    return True


def add_seeds_until_decided(ctx: "StudyContext", confirm: Callable[[list | None], Any], *,
                            max_seeds: int | None = None, hours: float | None = None, console: Any = None,
                            stricter: bool = False) -> list[Look]:
    """Add seeds to the target and the best competitor, one at a time, until the plan's verdict is conclusive,
    ``max_seeds`` is reached or ``hours`` are spent; every look goes to ``decide.json``. Returns the looks.
    ``confirm(runs)`` trains confirm runs (None: the spec's), handed in by ``Study.decide``: no stage imports one.

    A study whose fixed-design (95%) verdict is already decided, and that planned no sequential looks, is left
    as it is (no look, no run) unless ``stricter``: re-judging that look at a plan's stricter level may call it
    inconclusive and train more runs, which the user must ask for."""
    from analysis.sequential import verdict_at
    from analysis.verdict import INCONCLUSIVE
    from study.records.comparing import read_comparator, test_set_name
    from study.records.trial_tables import confirm_configs

    spec, paths = ctx.spec, ctx.paths
    compare = dict(roles=spec.arm_set.roles(), margin=spec.confirm.equivalence_margin,
                   comparator=read_comparator(paths), set_name=test_set_name(spec))
    plan, needs_seeds = sequential_plan(spec, paths, max_seeds), ValueError(
        "study decide needs --max-seeds (the spec plans no extra seeds: confirm.max_seeds)")
    if plan is None and not paths.confirm_results():  # no verdict yet to say it is decided
        raise needs_seeds
    trials, _ = ctx.tables()
    looks = list(getattr(read_decide_log(paths), "looks", []))  # a resumed decide goes on from its last look
    started = time.monotonic()
    confirm(None)  # the first look needs the confirm stage
    if not looks and spec.confirm.max_seeds is None and not stricter and _decided_already(ctx, compare, console):
        return []
    if plan is None:  # asked only once the study is known not to be decided already (issue 33, item 21)
        raise needs_seeds
    while True:
        per_image, runs, _ = load_confirm(paths)
        verdict = verdict_at(per_image, runs, plan, **compare)
        if verdict.best_other is None:
            raise ValueError(f"the confirm results in {paths.confirm} have no target and competitor to compare")
        counts = {m: int(verdict.table.loc[m, "seeds"]) for m in (verdict.target, verdict.best_other)}
        looks.append(Look(seeds=counts, best_other=verdict.best_other, diff=verdict.diff, ci=verdict.ci,
                          level=plan.level, verdict=verdict.verdict))
        write_decide_log(paths, DecideLog(max_seeds=plan.max_seeds, plan=plan.describe(), looks=looks))
        if console is not None:
            diff, low, high = (format_metric(verdict.metric, v) for v in (verdict.diff, *verdict.ci))
            console.print(f"look {len(looks)}: {counts} seeds, {verdict.target} - {verdict.best_other} = {diff} "
                          f"[{low}, {high}] at {100 * plan.level:.2f}%: {verdict.verdict}", highlight=False)
        out_of_time = hours is not None and time.monotonic() - started >= hours * 3600
        if verdict.verdict != INCONCLUSIVE or min(counts.values()) >= plan.max_seeds or out_of_time:
            return looks
        more = [run for m, n in counts.items() if n < plan.max_seeds
                for run in confirm_configs(spec, trials, seeds=range(n, n + 1), methods=[m])
                if run[1] == 1]  # the search's best configuration: the one the verdict compares
        confirm(more)
