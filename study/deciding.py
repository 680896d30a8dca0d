"""``study decide``: more seeds until the verdict is decided, and the sequential plan that judges each look.

``add_seeds_until_decided`` (``study decide``) buys certainty when the verdict is inconclusive: one more seed
at a time for the target and the best competitor, each look at the sequential plan's level
(``analysis.sequential``), until the verdict is conclusive or the seed or time budget ends; the looks go to
``decide.json``.
"""

from __future__ import annotations

import json
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import pandas as pd

from analysis.metric_table import format_metric
from study.files import atomic_write_json
from study.records import load_confirm, sequential_plan
from study.spec import StudySpec

if TYPE_CHECKING:
    from study.context import StudyContext


def decision_note(spec: StudySpec, verdict, plan, per_image: pd.DataFrame, *, roles: dict[str, str] | None = None,
                  comparator: str | None = None) -> str | None:
    """One report line: how many seeds the decision took, or what would decide it (projected from both measured
    variance parts: more seeds, more test images, or both, with numbers). ``comparator``: the arm fixed before the
    test split was scored (``study.comparator.read_comparator``); ``roles`` default to the spec's arms'."""
    from analysis.sequential import SequentialPlan, project, smallest_plan, test_set_reach, what_decides
    from analysis.verdict import INCONCLUSIVE

    if verdict.best_other is None:
        return None
    seeds = int(min(verdict.table.loc[verdict.target, "seeds"], verdict.table.loc[verdict.best_other, "seeds"]))
    if verdict.verdict != INCONCLUSIVE:
        if plan is None:
            return f"Decided with {seeds} seeds per method at the fixed 95% level (no sequential looks)."
        return (f"Decided after {seeds} seeds per method: look {seeds - plan.first_seeds + 1} of {plan.looks} "
                f"of the {plan.describe()}.")
    margin = spec.confirm.margin
    parts = project(per_image, roles=roles or spec.arm_set.roles(), margin=margin, comparator=comparator,
                    set_name=verdict.set_name)
    points = partial(format_metric, verdict.metric)
    reach_text = "" if parts is None else what_decides(parts, verdict.level, margin).describe(parts, points)
    if plan is not None and seeds >= plan.max_seeds:  # the plan is spent; what would decide it is still worth saying
        return (f"Not decided after {seeds} seeds per method, the plan's limit ({plan.describe()}): the two "
                f"methods are closer than this test split can resolve at that error rate. {reach_text}").rstrip()
    if parts is None:
        return None
    needed = smallest_plan(parts, margin, spent_alpha=0.0 if plan else 0.05)
    if needed is None:
        # The test images' own variance dominates: seeds cannot decide, so no `study decide` is offered.
        reach, _ = test_set_reach(parts, margin, parts.images, level=verdict.level)
        return (f"Undecided at margin {points(margin)} with {parts.images} test images, and more seeds under a "
                f"sequential plan are projected not to decide it: even with unlimited seeds this test set decides "
                f"only margins of {points(reach)} or more. {reach_text}")
    limit = plan.max_seeds if plan else needed.max_seeds
    return (f"Not decided after {seeds} seeds per method; under a sequential plan a decision is projected to take "
            f"about {needed.max_seeds} seeds per method. {reach_text} `study decide {spec.name} --max-seeds {limit}` "
            "adds seeds one at a time under a sequential plan"
            + ("." if plan else f" ({SequentialPlan(seeds, max(limit, seeds), spent_alpha=0.05).describe()})."))


def add_seeds_until_decided(ctx: "StudyContext", *, max_seeds: int | None = None, hours: float | None = None,
                            address: str | None = None, console: Any = None, progress: bool = True,
                            stricter: bool = False) -> list[dict]:
    """Add seeds to the target and the best competitor, one at a time, until the plan's verdict is conclusive,
    ``max_seeds`` is reached or ``hours`` are spent; every look goes to ``decide.json``. Returns the looks.

    A study whose fixed-design (95%) verdict is already decided, and that planned no sequential looks, is left
    as it is (no look, no run) unless ``stricter``: re-judging that look at a plan's stricter level may call it
    inconclusive and train more runs, which the user must ask for."""
    from analysis.sequential import verdict_at
    from analysis.verdict import INCONCLUSIVE, compute_verdict
    from study.comparing import read_comparator, test_set_name
    from study.confirm import confirm_configs, confirm_stage

    spec, paths = ctx.spec, ctx.paths
    compare = dict(roles=spec.arm_set.roles(), margin=spec.confirm.margin, comparator=read_comparator(paths),
                   set_name=test_set_name(spec))
    plan = sequential_plan(spec, paths, max_seeds)
    needs_seeds = ValueError("study decide needs --max-seeds (the spec plans no extra seeds: confirm.max_seeds)")
    if plan is None and not paths.confirm_results():  # no verdict yet to say it is decided
        raise needs_seeds
    trials, _ = ctx.tables()
    looks = json.loads(paths.decide.read_text())["looks"] if paths.decide.is_file() else []
    started = time.monotonic()
    confirm_stage(ctx, address=address, progress=progress)  # the first look needs the confirm stage
    if not looks and spec.confirm.max_seeds is None and not stricter:
        per_image, runs, _ = load_confirm(paths)
        fixed = compute_verdict(per_image, runs, **compare)
        if fixed.verdict != INCONCLUSIVE and fixed.best_other is not None:
            if console is not None:
                diff, low, high = (format_metric(fixed.metric, v) for v in (fixed.diff, *fixed.ci))
                console.print(f"study {spec.name} is already decided at the fixed 95% level: {fixed.verdict} "
                              f"({fixed.target} - {fixed.best_other} = {diff} [{low}, {high}]); nothing to add. "
                              "`study decide --stricter` re-judges it under a sequential plan, whose stricter level "
                              "may call it inconclusive and train more seeds.", highlight=False)
            return []
    if plan is None:  # asked only once the study is known not to be decided already (issue 33, item 21)
        raise needs_seeds
    while True:
        per_image, runs, _ = load_confirm(paths)
        verdict = verdict_at(per_image, runs, plan, **compare)
        if verdict.best_other is None:
            raise ValueError(f"the confirm results in {paths.confirm} have no target and competitor to compare")
        counts = {m: int(verdict.table.loc[m, "seeds"]) for m in (verdict.target, verdict.best_other)}
        looks.append({"seeds": counts, "best_other": verdict.best_other, "diff": verdict.diff,
                      "ci": list(verdict.ci), "level": plan.level, "verdict": verdict.verdict})
        atomic_write_json(paths.decide, {"max_seeds": plan.max_seeds, "plan": plan.describe(), "looks": looks})
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
        confirm_stage(ctx, address=address, progress=progress, runs=more)
