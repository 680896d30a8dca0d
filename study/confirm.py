"""The confirm stage and the report: from a finished search to an answer.

1. Take the best ``confirm.top_k`` configurations of each injection method from the search.
2. Retrain each with ``confirm.seeds`` seeds to the full budget (Ray tasks, in parallel across the
   cluster) and score the test split with beam search and the full metric suite, per image.
3. Each finished run is written to ``<study>/confirm/<method>-r<k>-s<seed>.json`` (its trained model beside it
   as ``.pt``) as soon as it ends, so an interrupted confirm stage resumes where it stopped (finished runs are
   never trained again).
4. ``analysis.report`` computes the verdict with bootstrap intervals, plots and writes the report. MLflow gets
   each confirm run as a child run (``kind=confirm``: parameters, test metrics, per-image scores, captions and
   checkpoint as artifacts), and the parent the report, the verdict table (``verdict.csv`` and the
   ``verdict.json`` table) and a few headline metrics (tag ``verdict``).
5. ``decide`` (``study decide``) buys certainty when the verdict is inconclusive: one more seed at a time for
   the target and the best competitor, each look at the sequential plan's level (``analysis.sequential``),
   until the verdict is conclusive or the seed or time budget ends; the looks go to ``<study>/decide.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from study.config import TrialConfig
from study.spec import StudySpec

def confirm_configs(spec: StudySpec, trials: pd.DataFrame, *, seeds: range | None = None,
                    methods: list[str] | None = None) -> list[tuple[str, int, int, TrialConfig]]:
    """(method, rank, seed, config) of every confirm run: the best ``top_k`` trials of each method, with
    ``seeds`` (default: the spec's ``confirm.seeds`` first ones) for ``methods`` (default: all)."""
    runs = []
    epochs = spec.confirm.epochs or spec.asha.max_epochs
    chosen = confirmed_trials(spec, trials)
    for _, row in chosen[chosen["method"].isin(methods or spec.methods)].iterrows():
        sampled = {k: row[k] for k in spec.space if k in row and not _missing(row[k])}
        for seed in seeds if seeds is not None else range(spec.confirm.seeds):
            cfg = spec.trial_config({**sampled, "seed": 1000 + seed, "epochs": epochs,
                                     "beam_size": spec.confirm.beam_size})
            runs.append((row["method"], int(row["config_rank"]), seed, cfg))
    return runs


def confirmed_trials(spec: StudySpec, trials: pd.DataFrame) -> pd.DataFrame:
    """The search trials the confirm stage retrains: each method's best ``top_k`` by the spec's metric (each
    trial scored by its best epoch), with ``method, config_rank, trial_id``, the metric and the searched
    parameters (None where a conditional one was not sampled)."""
    done = trials[trials["status"] != "errored"] if "status" in trials else trials
    rows = []
    for method in spec.methods:
        best = done[done["inject"] == method].sort_values(spec.metric, ascending=spec.mode == "min")
        for rank, (_, row) in enumerate(best.head(spec.confirm.top_k).iterrows(), start=1):
            rows.append({"method": method, "config_rank": rank, "trial_id": row.get("trial_id"),
                         spec.metric: row.get(spec.metric),
                         **{k: (None if _missing(row.get(k)) else row.get(k)) for k in spec.space if k != "inject"}})
    return pd.DataFrame(rows, columns=None if rows else ["method", "config_rank", "trial_id"])


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def run_name(method: str, rank: int, seed: int) -> str:
    return f"{method}-r{rank}-s{seed}"


def confirm_one(cfg: TrialConfig, data) -> dict[str, Any]:
    """Train one confirm run and score the test split per image (runs inside a Ray task or locally)."""
    import tempfile
    import time

    from study.inference import load_captioner
    from study.training import CHECKPOINT_FILE, FeatureSource, evaluate, pick_device, run_trial

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="confirm-") as tmp:
        result = run_trial(cfg, data, work_dir=Path(tmp), progress=False)
        device = pick_device()
        model, _, _ = load_captioner(Path(tmp) / "checkpoint", device)
        # The model goes back with the scores (this task may run on another node): the driver keeps it.
        checkpoint = (Path(tmp) / "checkpoint" / CHECKPOINT_FILE).read_bytes()
    features = FeatureSource(data, device, need_grid=model.needs_grid)
    scores, captions, per_image = evaluate(model, cfg, data, data.tokens_for(cfg), "test", features, device,
                                           beam_size=cfg.beam_size, full=True, per_image=True)
    return {"config": cfg.model_dump(mode="json", by_alias=True, exclude={"dataset"}),
            "scores": scores, "captions": captions,
            "per_image": {m: {str(k): v for k, v in d.items()} for m, d in per_image.items()},
            "params": result["params"], "epochs": len(result["epochs"]),
            "train_seconds": sum(e["train_seconds"] for e in result["epochs"]),
            "seconds": time.perf_counter() - t0, "checkpoint": checkpoint}


def run_confirm(spec: StudySpec, folder: Path, trials: pd.DataFrame, data, *, progress: bool = True,
                runs: list[tuple[str, int, int, TrialConfig]] | None = None) -> Path:
    """Run every missing confirm run (default: the spec's) as a Ray task; write each result as it finishes."""
    import ray

    out = folder / "confirm"
    out.mkdir(parents=True, exist_ok=True)
    todo = [(m, r, s, cfg) for m, r, s, cfg in (confirm_configs(spec, trials) if runs is None else runs)
            if not (out / f"{run_name(m, r, s)}.json").exists()]
    if not todo:
        return out
    remote = ray.remote(num_cpus=spec.resources.cpu, num_gpus=spec.resources.gpu,
                        max_retries=spec.max_failures)(confirm_one)
    data_ref = ray.put(data)
    pending = {remote.remote(cfg, data_ref): (m, r, s) for m, r, s, cfg in todo}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(pending), desc="confirm runs", disable=not progress)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        method, rank, seed = pending.pop(ready[0])
        result = ray.get(ready[0])
        result.update(method=method, config_rank=rank, seed=seed)
        checkpoint = result.pop("checkpoint", None)
        if checkpoint is not None:  # first: a .json without its .pt is an older run, never the reverse
            tmp = out / f"{run_name(method, rank, seed)}.pt.tmp"
            tmp.write_bytes(checkpoint)
            os.replace(tmp, out / f"{run_name(method, rank, seed)}.pt")
        tmp = out / f"{run_name(method, rank, seed)}.json.tmp"
        tmp.write_text(json.dumps(result))
        os.replace(tmp, out / f"{run_name(method, rank, seed)}.json")
        bar.update(1)
    bar.close()
    return out


def load_confirm(folder: Path, data) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(per_image, runs, gallery) frames for the analysis from the confirm folder."""
    per_image_rows, run_rows, gallery_rows = [], [], []
    test = data.images["test"]
    for path in sorted((folder / "confirm").glob("*.json")):
        result = json.loads(path.read_text())
        method, rank, seed = result["method"], result["config_rank"], result["seed"]
        metrics = result["per_image"]
        ids = sorted({k for d in metrics.values() for k in d}, key=int)
        for image_id in ids:
            row = {"method": method, "config_rank": rank, "seed": seed, "image_id": int(image_id)}
            for name in ("CIDEr-D", "BLEU-4", "METEOR", "ROUGE-L"):
                row[name] = metrics.get(name, {}).get(image_id, float("nan"))
            per_image_rows.append(row)
        run_rows.append({"method": method, "config_rank": rank, "seed": seed, "params": result["params"],
                         "train_seconds": result["train_seconds"], "seconds": result.get("seconds", float("nan")),
                         "epochs": result["epochs"], "test_images": len(result["captions"]),
                         "distinct_captions": len(set(result["captions"])), **result["scores"]})
        if rank == 1 and seed == 0:
            for i in range(min(6, len(result["captions"]))):
                gallery_rows.append({"image_path": str(test.paths[i]), "method": method,
                                     "caption": result["captions"][i], "reference": test.references[i][0]})
    return pd.DataFrame(per_image_rows), pd.DataFrame(run_rows), pd.DataFrame(gallery_rows)


def sequential_plan(spec: StudySpec, folder: Path, max_seeds: int | None = None):
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
    record = folder / "decide.json"
    if max_seeds is None and record.is_file():
        max_seeds = json.loads(record.read_text())["max_seeds"]
    if max_seeds is None:
        return None
    return SequentialPlan(spec.confirm.seeds, max_seeds, spent_alpha=0.05)


def decision_note(spec: StudySpec, verdict, plan, per_image: pd.DataFrame) -> str | None:
    """One report line: how many seeds the decision took, or would take (projected)."""
    from analysis.sequential import SequentialPlan, project, smallest_plan
    from analysis.verdict import INCONCLUSIVE
    from study.registry import method_roles

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
    guess = ("more seeds alone are projected not to decide it (the test images' own variance is too large)"
             if needed is None else f"a decision is projected to take about {needed.max_seeds} seeds per method "
             "(assuming the difference stays at its estimate: a guide, not a promise)")
    limit = plan.max_seeds if plan else (needed.max_seeds if needed else 3 * spec.confirm.seeds)
    return (f"Not decided after {seeds} seeds per method; {guess}. `study decide {spec.name} --max-seeds "
            f"{limit}` adds seeds one at a time under a sequential plan"
            + ("." if plan else f" ({SequentialPlan(seeds, max(limit, seeds), spent_alpha=0.05).describe()})."))


def decide(spec: StudySpec, spec_path: Path, *, max_seeds: int | None = None, hours: float | None = None,
           address: str | None = None, console=None, progress: bool = True) -> Path:
    """Add seeds to the target and the best competitor, one at a time, until the plan's verdict is conclusive,
    ``max_seeds`` is reached or ``hours`` are spent; every look goes to ``decide.json``; then the report."""
    import time

    from analysis.sequential import verdict_at
    from analysis.verdict import INCONCLUSIVE
    from study import tuning
    from study.data.prepare import prepare
    from study.registry import method_roles

    folder = tuning.study_dir(spec)
    plan = sequential_plan(spec, folder, max_seeds)
    if plan is None:
        raise ValueError("study decide needs --max-seeds (the spec plans no extra seeds: confirm.max_seeds)")
    trials, _ = tuning.load_trial_tables(spec)
    data = prepare(spec.dataset, tuning.token_settings(spec), need_grid=tuning.needs_grid(spec), progress=progress)
    record = folder / "decide.json"
    looks = json.loads(record.read_text())["looks"] if record.is_file() else []
    started = time.monotonic()
    tuning.ensure_ray(address)
    try:
        run_confirm(spec, folder, trials, data, progress=progress)  # the first look needs the confirm stage
        while True:
            per_image, runs, _ = load_confirm(folder, data)
            verdict = verdict_at(per_image, runs, plan, roles=method_roles(), margin=spec.confirm.margin)
            if verdict.best_other is None:
                raise ValueError(f"the confirm results in {folder / 'confirm'} have no target and competitor to compare")
            counts = {m: int(verdict.table.loc[m, "seeds"]) for m in (verdict.target, verdict.best_other)}
            looks.append({"seeds": counts, "best_other": verdict.best_other, "diff": verdict.diff,
                          "ci": list(verdict.ci), "level": plan.level, "verdict": verdict.verdict})
            tuning.atomic_write_json(record, {"max_seeds": plan.max_seeds, "plan": plan.describe(), "looks": looks})
            if console is not None:
                console.print(f"look {len(looks)}: {counts} seeds, {verdict.target} - {verdict.best_other} = "
                              f"{100 * verdict.diff:.1f} [{100 * verdict.ci[0]:.1f}, {100 * verdict.ci[1]:.1f}] "
                              f"at {100 * plan.level:.2f}%: {verdict.verdict}", highlight=False)
            out_of_time = hours is not None and time.monotonic() - started >= hours * 3600
            if verdict.verdict != INCONCLUSIVE or min(counts.values()) >= plan.max_seeds or out_of_time:
                break
            more = [run for m, n in counts.items() if n < plan.max_seeds
                    for run in confirm_configs(spec, trials, seeds=range(n, n + 1), methods=[m])
                    if run[1] == 1]  # the search's best configuration: the one the verdict compares
            run_confirm(spec, folder, trials, data, progress=progress, runs=more)
    finally:
        tuning.shutdown()
    return confirm_and_report(spec, spec_path, console=console, address=address, progress=progress)


def confirm_and_report(spec: StudySpec, spec_path: Path, *, console=None, address: str | None = None,
                       progress: bool = True) -> Path:
    """Confirm stage (resumable) + verdict + report, logged to the study's MLflow parent run."""
    from analysis.report import build_report
    from study.provenance import provenance
    from study import tuning
    from study.data.prepare import prepare
    from study.registry import method_colors, method_roles
    from study.tracking import StudyTracker, git_commit, source_tags

    folder = tuning.study_dir(spec)
    trials, history = tuning.load_trial_tables(spec)
    data = prepare(spec.dataset, tuning.token_settings(spec), need_grid=tuning.needs_grid(spec), progress=progress)
    tuning.ensure_ray(address)
    try:
        run_confirm(spec, folder, trials, data, progress=progress)
    finally:
        tuning.shutdown()
    per_image, runs, gallery = load_confirm(folder, data)
    plan = sequential_plan(spec, folder)
    result = build_report(folder / "report", study_name=spec.name, trials=trials, history=history,
                          per_image=per_image, runs=runs, space=spec.space_description(), gallery=gallery,
                          margin=spec.confirm.margin, roles=method_roles(), colors=method_colors(),
                          spec_text=Path(spec_path).read_text(), level=plan.level if plan else 0.95,
                          decision=lambda verdict: decision_note(spec, verdict, plan, per_image),
                          resources=spec.resources.model_dump(), confirmed=confirmed_trials(spec, trials),
                          provenance=provenance(folder, data.info, report_commit=git_commit()))
    verdict = result.verdict
    tracker = StudyTracker(tuning.tracking_uri(spec), spec.tracking.experiment or spec.name, spec.name, folder)
    tracker.child_tags = source_tags("study report")
    log_confirm_runs(spec, folder, tracker)
    table = verdict_table(verdict, method_roles())
    table.to_csv(folder / "verdict.csv", index=False)
    tracker.study_artifact(folder / "verdict.csv")
    if len(table):
        tracker.study_table({c: json.loads(table[c].to_json(orient="values")) for c in table.columns}, "verdict.json")
    tracker.study_tags({"verdict": verdict.verdict, "verdict_text": verdict.text[:4000]},
                       verdict_metrics(verdict))
    tracker.study_artifact(result.path.parent, "report")
    if console is not None:
        console.print(f"\nverdict: {verdict.verdict}\n{verdict.text}\nreport: {result.path}")
    return result.path


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


def log_confirm_runs(spec: StudySpec, folder: Path, tracker) -> int:
    """Each confirm run not yet in MLflow as a child run of the study's parent: its searched parameters
    (only those active for its configuration), seed and budget; its test scores; as artifacts its result
    (per-image scores and captions), its per-image scores as CSV and its checkpoint. Returns how many were new."""
    from study.tracking import CONFIRM_PREFIX

    new = 0
    for path in sorted((folder / "confirm").glob("*.json")):
        name = path.stem
        if CONFIRM_PREFIX + name in tracker.confirm_logged:  # journalled before: only new runs are logged
            continue
        result = json.loads(path.read_text())
        config = result["config"]
        params = {k: config[k] for k, p in spec.space.items() if k in config and p.matches(config)}
        params.update(method=result["method"], config_rank=result["config_rank"], seed=config.get("seed"),
                      epochs=config.get("epochs"), beam_size=config.get("beam_size"), params=result["params"])
        metrics = {f"test_{k}": v for k, v in result["scores"].items()}
        metrics.update(train_seconds=result["train_seconds"], seconds=result.get("seconds", float("nan")))
        per_image = pd.DataFrame({m: pd.Series(d) for m, d in result["per_image"].items()})
        per_image.index.name = "image_id"
        csv = path.with_suffix(".per_image.csv")
        per_image.sort_index(key=lambda ids: ids.astype(int)).to_csv(csv)
        artifacts = [path, csv] + [p for p in [path.with_suffix(".pt")] if p.exists()]
        new += tracker.confirm_run(name, params, {k: v for k, v in metrics.items() if v == v}, artifacts)
    return new
