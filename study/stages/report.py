"""From confirm runs to an answer on record: the verdict, the report, and their evidence in MLflow.

``write_report`` computes the verdict with bootstrap intervals (``analysis``) against the study's fixed comparator
(``study.records.comparing``), writes the report, adds each test set's look to the test-split ledger
(``study.records.ledger``:
the report lists the earlier looks at the same splits), and gives
MLflow each confirm run as a child run (``kind=confirm``), the parent the report, the verdict table
(``verdict.csv`` and the ``verdict.json`` table), each arm's test scores (the ``test_scores.json`` table) and a few
headline metrics (tag ``verdict``). ``decision_note`` is the report's sentence on what decided the verdict, or
what would (more seeds, more test images, or both, projected from the measured variance parts).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from analysis.metric_table import format_metric
from study.records.decide_log import plan_level, sequential_plan
from study.tracking.mlflow_view import experiment_address

if TYPE_CHECKING:
    from study.context import StudyContext
    from study.spec import StudySpec


def write_report(ctx: "StudyContext", *, console: Any = None) -> Path:
    """Verdict + report from the finished confirm runs, logged to the study's MLflow parent run."""
    from analysis.forks import fork_blocks
    from analysis.report import ReportInputs, VerdictSettings, build_report
    from analysis.training_length import length_blocks
    from study.records import read_test_split, write_test_split
    from study.records.comparing import BOOT_SEED, N_BOOT, read_comparator, read_comparator_record, test_set_name
    from study.records.ledger import comparator_rule, earlier_looks, record_looks
    from study.records.provenance import provenance, write_report_provenance
    from study.records.run_results import confirm_history, load_confirm
    from study.records.trial_tables import confirmed_trials
    from study.records.verdicts import evaluated_verdicts, report_blocks, split_fingerprints
    from study.tracking import git_commit

    spec, paths = ctx.spec, ctx.paths
    # What the report needs of the data was recorded by the confirm stage: no feature cache walked, no CNN run.
    test_split = read_test_split(paths) or write_test_split(paths, ctx.data())  # older studies: once
    data_info = test_split.info
    trials, history = ctx.tables()
    origin = provenance(paths, data_info, report_commit=git_commit())
    per_image, runs, gallery = load_confirm(paths, test_split)
    plan = sequential_plan(spec, paths)
    level, comparator, test_name = plan_level(plan), read_comparator(paths), test_set_name(spec)
    notes: dict[str, str | None] = {}  # the decision note, computed once for the report and the console
    # study evaluate's sets and the pooled verdict (study/records/verdicts.py): [] for a study never evaluated
    evaluated = evaluated_verdicts(paths, spec, level=level)
    extra = report_blocks(paths, spec, per_image, paths.report, level=level, roles=spec.arm_set.roles(),
                          colors=spec.arm_set.colors(), verdicts=evaluated)
    # the confirm runs' own validation curves: did they still rise when training ended?
    extra = length_blocks(confirm_history(paths), paths.report, spec.arm_set.colors(), metric=spec.metric) + extra
    extra = arm_blocks(spec) + extra
    splits = split_fingerprints(paths, spec, data_info)  # the test splits scored, and the earlier looks at them
    extra += fork_blocks(earlier_looks(paths.ledger, spec, ctx.spec_text, splits))
    inputs = ReportInputs(trials, history, per_image, runs, gallery, confirmed_trials(spec, trials),
                          spec.space_description(), ctx.spec_text, origin, spec.resources.model_dump())
    settings = VerdictSettings(spec.arm_set.roles(), spec.arm_set.colors(), spec.confirm.equivalence_margin,
                               level=level, n_boot=N_BOOT, seed=BOOT_SEED, comparator=comparator, set_name=test_name)
    result = build_report(paths.report, spec.name, inputs, settings, extra_blocks=extra, decision=lambda verdict:
                          notes.setdefault("decision", decision_note(spec, verdict, plan, per_image,
                                                                  comparator=comparator)))
    write_report_provenance(paths, origin)
    verdict = result.verdict
    record_looks(paths.ledger, spec, ctx.spec_text, {test_name: verdict, **evaluated}, splits,
                 comparator_rule(read_comparator_record(paths)))
    log_evidence(ctx, verdict, result.path.parent)
    if console is not None:
        _print_verdict(ctx, console, result, notes.get("decision"))
    return result.path


def _print_verdict(ctx: "StudyContext", console: Any, result, note: str | None) -> None:
    """The verdict in words, the decision note, where the report is and where to look next."""
    from study.console import wrapped

    verdict = result.verdict
    console.print(wrapped(f"\nverdict: {verdict.verdict}\n{verdict.text}" + (f"\n{note}" if note else ""))
                  + f"\nreport: {result.path}", highlight=False)
    console.print(next_steps(ctx, result.html), highlight=False, soft_wrap=True, markup=False)


def log_evidence(ctx: "StudyContext", verdict, report_dir: Path) -> None:
    """MLflow's copy of the answer: the confirm runs not logged yet, and on the parent run the verdict
    (``verdict.csv``, the ``verdict.json`` table, tags and headline metrics), every arm's test scores side by side
    (the ``test_scores.json`` table: one row per arm, mean and sd over seeds, in points) and the report's folder."""
    from analysis.metric_table import in_points
    from study.records.frames import confirm_frame, test_scores
    from study.tracking import log_confirm_runs, source_tags

    spec, paths = ctx.spec, ctx.paths
    tracker = ctx.tracker()
    tracker.child_tags = source_tags("study report")
    log_confirm_runs(spec, paths, tracker)
    table = in_points(verdict_table(verdict, spec.arm_set.roles()))  # what a person and MLflow read: points
    table.to_csv(paths.verdict_csv, index=False)
    tracker.study_artifact(paths.verdict_csv)
    if len(table):
        tracker.study_table(_columns(table), "verdict.json")
    scores = in_points(test_scores(confirm_frame(paths, spec), spec.methods))
    if len(scores):  # the verdict's score first: the table's first screen holds the comparison
        roles = spec.arm_set.roles()
        scores.insert(1, "role", [roles.get(m, "") for m in scores["method"]])
        first = ["method", "role", "seeds", f"{verdict.metric}_mean", f"{verdict.metric}_std"]
        scores = scores[[c for c in first if c in scores] + [c for c in scores if c not in first]]
        tracker.study_table(_columns(scores), "test_scores.json")
    tracker.study_tags({"verdict": verdict.verdict, "verdict_text": verdict.text[:4000]}, verdict_metrics(verdict))
    tracker.study_artifact(report_dir, "report")
    tracker.finish_study()  # the parent run's end moves to now: its duration covers search, confirm and report


def next_steps(ctx: "StudyContext", html: Path | None) -> str:
    """Where to look next: the HTML report, and the commands that open MLflow's and Optuna's views of the study."""
    lines = []
    if html is not None:
        lines.append(f"report (one page, figures inside): {html}")
    # The training view (not MLflow 3's GenAI one), with the study's columns and every run drawn (mlflow_view.py).
    experiment = ctx.experiment_id() or 1
    lines.append(f"MLflow UI:   mlflow ui --backend-store-uri {ctx.tracking_uri}   then "
                 f"{experiment_address(experiment)}\n             the arms side by side (confirm runs grouped by "
                 f"arm, one bar each): {experiment_address(experiment, arms=True)}")
    if ctx.paths.optuna_db.is_file():
        lines.append(f"Optuna:      optuna-dashboard sqlite:///{ctx.paths.optuna_db.resolve()}   "
                     "(pip install 'caption-study[ui]')")
    return "\n".join(lines)


def _columns(table: pd.DataFrame) -> dict[str, list]:
    """A frame as ``mlflow.log_table`` takes it: column name -> JSON-able values (NaN as null)."""
    return {c: json.loads(table[c].to_json(orient="values")) for c in table.columns}


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


def arm_blocks(spec) -> list:
    """What each arm of the verdict is (cells, which state the image seeds), as the spec defines it."""
    arms = spec.arm_set
    if not arms:
        return []
    roles = arms.roles()
    rows = [[name, roles[name], arms.describe(name).split(": ", 1)[1]] for name in arms.names]
    return [("h2", "The arms compared"), ("table", ["arm", "role", "what it is"], rows)]


def decision_note(spec: "StudySpec", verdict, plan, per_image: pd.DataFrame, *, roles: dict[str, str] | None = None,
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
    margin = spec.confirm.equivalence_margin
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
