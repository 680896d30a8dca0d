"""From confirm runs to an answer: the verdict, its report and MLflow evidence, and ``study decide``.

``write_report`` computes the verdict with bootstrap intervals (``analysis``), writes the report, and gives
MLflow each confirm run as a child run (``kind=confirm``), the parent the report, the verdict table
(``verdict.csv`` and the ``verdict.json`` table) and a few headline metrics (tag ``verdict``).

``add_seeds_until_decided`` (``study decide``) buys certainty when the verdict is inconclusive: one more seed
at a time for the target and the best competitor, each look at the sequential plan's level
(``analysis.sequential``), until the verdict is conclusive or the seed or time budget ends; the looks go to
``decide.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from study.files import atomic_write_json
from study.paths import StudyPaths
from study.registry import method_colors, method_roles
from study.spec import StudySpec, format_metric

if TYPE_CHECKING:
    from study.study import Study


def sequential_plan(spec: StudySpec, paths: StudyPaths, max_seeds: int | None = None):
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
    if max_seeds is None and paths.decide.is_file():
        max_seeds = json.loads(paths.decide.read_text())["max_seeds"]
    if max_seeds is None:
        return None
    return SequentialPlan(spec.confirm.seeds, max_seeds, spent_alpha=0.05)


def decision_note(spec: StudySpec, verdict, plan, per_image: pd.DataFrame) -> str | None:
    """One report line: how many seeds the decision took, or would take (projected)."""
    from analysis.sequential import SequentialPlan, project, smallest_plan, test_set_reach
    from analysis.verdict import INCONCLUSIVE
    if verdict.best_other is None:
        return None
    seeds = int(min(verdict.table.loc[verdict.target, "seeds"], verdict.table.loc[verdict.best_other, "seeds"]))
    if verdict.verdict != INCONCLUSIVE:
        if plan is None:
            return f"Decided with {seeds} seeds per method at the fixed 95% level (no sequential looks)."
        return (f"Decided after {seeds} seeds per method: look {seeds - plan.first_seeds + 1} of {plan.looks} "
                f"of the {plan.describe()}.")
    if plan is not None and seeds >= plan.max_seeds:
        return (f"Not decided after {seeds} seeds per method, the plan's limit ({plan.describe()}): the two "
                "methods are closer than this test split can resolve at that error rate.")
    parts = project(per_image, roles=method_roles(), margin=spec.confirm.margin)
    needed = None if parts is None else smallest_plan(parts, spec.confirm.margin, spent_alpha=0.0 if plan else 0.05)
    if needed is None and parts is not None:
        # The test images' own variance dominates: seeds cannot decide, so no `study decide` is offered.
        images = int(verdict.table.loc[verdict.target, "images"])
        reach, images_needed = test_set_reach(parts, spec.confirm.margin, images, level=verdict.level)
        wants = ("no test set size would decide it: the estimate sits on the margin" if images_needed is None
                 else f"margin {format_metric(verdict.metric, spec.confirm.margin)} would need about "
                 f"{images_needed:,.0f} test images")
        return (f"Undecided at margin {format_metric(verdict.metric, spec.confirm.margin)} with {images} test "
                f"images, and more seeds are projected not to decide it (the test images' own variance dominates): "
                f"even with unlimited seeds this test set decides only margins of "
                f"{format_metric(verdict.metric, reach)} or more; {wants} (assuming the difference stays at its "
                "estimate).")
    guess = ("more seeds alone are projected not to decide it (the test images' own variance is too large)"
             if needed is None else f"a decision is projected to take about {needed.max_seeds} seeds per method "
             "(assuming the difference stays at its estimate: a guide, not a promise)")
    limit = plan.max_seeds if plan else (needed.max_seeds if needed else 3 * spec.confirm.seeds)
    return (f"Not decided after {seeds} seeds per method; {guess}. `study decide {spec.name} --max-seeds "
            f"{limit}` adds seeds one at a time under a sequential plan"
            + ("." if plan else f" ({SequentialPlan(seeds, max(limit, seeds), spent_alpha=0.05).describe()})."))


def add_seeds_until_decided(study: "Study", *, max_seeds: int | None = None, hours: float | None = None,
                            address: str | None = None, console: Any = None, progress: bool = True,
                            stricter: bool = False) -> list[dict]:
    """Add seeds to the target and the best competitor, one at a time, until the plan's verdict is conclusive,
    ``max_seeds`` is reached or ``hours`` are spent; every look goes to ``decide.json``. Returns the looks.

    A study whose fixed-design (95%) verdict is already decided, and that planned no sequential looks, is left
    as it is (no look, no run) unless ``stricter``: re-judging that look at a plan's stricter level may call it
    inconclusive and train more runs, which the user must ask for."""
    from analysis.sequential import verdict_at
    from analysis.verdict import INCONCLUSIVE, compute_verdict
    from study.confirm import confirm_configs, load_confirm

    spec, paths = study.spec, study.paths
    plan = sequential_plan(spec, paths, max_seeds)
    if plan is None:
        raise ValueError("study decide needs --max-seeds (the spec plans no extra seeds: confirm.max_seeds)")
    trials, _ = study.tables()
    looks = json.loads(paths.decide.read_text())["looks"] if paths.decide.is_file() else []
    started = time.monotonic()
    study.confirm(address=address, progress=progress)  # the first look needs the confirm stage
    if not looks and spec.confirm.max_seeds is None and not stricter:
        per_image, runs, _ = load_confirm(paths, study.data(progress=progress))
        fixed = compute_verdict(per_image, runs, roles=method_roles(), margin=spec.confirm.margin)
        if fixed.verdict != INCONCLUSIVE and fixed.best_other is not None:
            if console is not None:
                diff, low, high = (format_metric(fixed.metric, v) for v in (fixed.diff, *fixed.ci))
                console.print(f"study {spec.name} is already decided at the fixed 95% level: {fixed.verdict} "
                              f"({fixed.target} - {fixed.best_other} = {diff} [{low}, {high}]); nothing to add. "
                              "`study decide --stricter` re-judges it under a sequential plan, whose stricter level "
                              "may call it inconclusive and train more seeds.", highlight=False)
            return []
    while True:
        per_image, runs, _ = load_confirm(paths, study.data(progress=progress))
        verdict = verdict_at(per_image, runs, plan, roles=method_roles(), margin=spec.confirm.margin)
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
        study.confirm(address=address, progress=progress, runs=more)


def write_report(study: "Study", *, console: Any = None) -> Path:
    """Verdict + report from the finished confirm runs, logged to the study's MLflow parent run."""
    from analysis.report import build_report
    from study.confirm import confirmed_trials, load_confirm, log_confirm_runs
    from study.provenance import provenance
    from study.tracking import git_commit, source_tags

    spec, paths, data = study.spec, study.paths, study.data()
    trials, history = study.tables()
    origin = provenance(paths, data.info, report_commit=git_commit())
    per_image, runs, gallery = load_confirm(paths, data)
    plan = sequential_plan(spec, paths)
    notes: dict[str, str | None] = {}  # the decision note, computed once for the report and the console
    # study evaluate's sets and the pooled verdict (study/cross_dataset.py): [] for a study never evaluated
    from study.cross_dataset import report_blocks

    extra = report_blocks(paths, spec, per_image, paths.report, level=plan.level if plan else 0.95,
                          roles=method_roles(), colors=method_colors())
    result = build_report(paths.report, study_name=spec.name, trials=trials, history=history,
                          per_image=per_image, runs=runs, space=spec.space_description(), gallery=gallery,
                          margin=spec.confirm.margin, roles=method_roles(), colors=method_colors(),
                          spec_text=study.spec_text, level=plan.level if plan else 0.95,
                          decision=lambda verdict: notes.setdefault("decision",
                                                                    decision_note(spec, verdict, plan, per_image)),
                          resources=spec.resources.model_dump(), confirmed=confirmed_trials(spec, trials),
                          provenance=origin, extra_blocks=extra)
    atomic_write_json(paths.report / "provenance.json", origin, indent=2)
    verdict = result.verdict
    tracker = study.tracker()
    tracker.child_tags = source_tags("study report")
    log_confirm_runs(spec, paths, tracker)
    table = verdict_table(verdict, method_roles())
    table.to_csv(paths.verdict_csv, index=False)
    tracker.study_artifact(paths.verdict_csv)
    if len(table):
        tracker.study_table({c: json.loads(table[c].to_json(orient="values")) for c in table.columns}, "verdict.json")
    tracker.study_tags({"verdict": verdict.verdict, "verdict_text": verdict.text[:4000]},
                       verdict_metrics(verdict))
    tracker.study_artifact(result.path.parent, "report")
    tracker.finish_study()  # the parent run's end moves to now: its duration covers search, confirm and report
    if console is not None:
        note = notes.get("decision")
        console.print(f"\nverdict: {verdict.verdict}\n{verdict.text}" + (f"\n{note}" if note else "")
                      + f"\nreport: {result.path}", highlight=False)
        console.print(next_steps(study, result.html), highlight=False, soft_wrap=True, markup=False)
    return result.path


def next_steps(study: "Study", html: Path | None) -> str:
    """Where to look next: the HTML report, and the commands that open MLflow's and Optuna's views of the study."""
    lines = []
    if html is not None:
        lines.append(f"report (one page, figures inside): {html}")
    # ?workflowType=machine_learning: MLflow 3 opens an experiment in its GenAI view (an empty Overview) else.
    lines.append(f"MLflow UI:   mlflow ui --backend-store-uri {study.tracking_uri}   then "
                 f"http://127.0.0.1:5000/#/experiments/{study.experiment_id() or 1}?workflowType=machine_learning")
    if study.paths.optuna_db.is_file():
        lines.append(f"Optuna:      optuna-dashboard sqlite:///{study.paths.optuna_db.resolve()}   "
                     "(pip install 'caption-study[ui]')")
    return "\n".join(lines)


def verdict_table(verdict, roles: dict[str, str]) -> pd.DataFrame:
    """One row per method: its role, configuration rank, seeds, images and each metric's mean and interval."""
    table = verdict.table.rename_axis("method").reset_index()
    if "role" not in table:
        table.insert(1, "role", [roles.get(m, "") for m in table["method"]])
    if "level" not in table:
        table.insert(2, "level", verdict.level)
    return table


def verdict_metrics(verdict) -> dict[str, float]:
    """The parent run's headline metrics: the compared difference and its interval, each method's test score."""
    out = {"verdict.diff": verdict.diff, "verdict.ci_low": verdict.ci[0], "verdict.ci_high": verdict.ci[1],
           "verdict.margin": verdict.margin}
    for method, row in verdict.table.iterrows():
        if verdict.metric in row:
            out[f"test_{verdict.metric}.{method}"] = row[verdict.metric]
    return {k: float(v) for k, v in out.items() if v is not None and not pd.isna(v)}
