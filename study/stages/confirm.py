"""The confirm stage: the search's best configurations retrained with several seeds and scored on the test split.

1. Take the best ``confirm.top_k`` configurations of each injection method from the search.
2. Retrain each with ``confirm.seeds`` seeds to the full budget (Ray tasks, in parallel across the
   cluster) and score the test split with beam search and the full metric suite, per image.
3. Each finished run is written to ``<study>/confirm/<method>-r<k>-s<seed>.json`` (its trained model beside it
   as ``.pt``) as soon as it ends, so an interrupted confirm stage resumes where it stopped (finished runs are
   never trained again).
4. ``study.tracking.log_confirm_runs`` gives MLflow each confirm run as a child run (``kind=confirm``: parameters,
   test metrics, per-image scores, captions and checkpoint as artifacts).

The verdict, the report and ``study decide`` read these files: see ``study.stages.report`` and ``study.stages.decide``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager

import pandas as pd

from study.config import TrialConfig
from study.records import missing, read_test_split, write_test_split
from study.records.files import atomic_write_bytes
from study.records.paths import StudyPaths
from study.records.run_results import ConfirmResult, RecordError, read_confirm_result, write_confirm_result
from study.records.trial_tables import NoScoredTrial, confirm_configs, confirmed_trials, run_name
from study.spec import StudySpec

if TYPE_CHECKING:
    from study.context import StudyContext

log = logging.getLogger(__name__)


def confirm_one(cfg: TrialConfig, data) -> dict[str, Any]:
    """Train one confirm run and score the test split per image (runs inside a Ray task or locally)."""
    import tempfile
    import time

    from study.trial.checkpoints import CHECKPOINT_FILE
    from study.trial.evaluation import Decoding, score_split
    from study.trial.selection import kept_checkpoint_dir
    from study.trial.training import run_trial

    t0, started = time.perf_counter(), int(time.time() * 1000)
    with tempfile.TemporaryDirectory(prefix="confirm-") as tmp:
        # Training chooses the run's model on validation alone; the test split is read only after it returns.
        result = run_trial(cfg, data, work_dir=Path(tmp), progress=False)
        # The model goes back with the scores (this task may run on another node): the driver keeps it. With the
        # best-validation rule that is the chosen epoch's checkpoint, the model scored below.
        checkpoint = (kept_checkpoint_dir(Path(tmp), cfg.select_metric) / CHECKPOINT_FILE).read_bytes()
    cfg = cfg.model_copy(update={"precision": result.precision})  # auto, as the run resolved it
    test = score_split(result.model, data, "test", vocab=data.tokens_for(cfg).vocab, decoding=Decoding.of(cfg),
                       full=True, per_image=True)
    return {"config": cfg.model_dump(mode="json", by_alias=True, exclude={"dataset"}),
            "scores": test.scores, "captions": test.captions,
            "per_image": {m: {str(k): v for k, v in d.items()} for m, d in test.per_image.items()},
            "params": result.record["params"], "epochs": len(result.epochs),
            "train_seconds": sum(e["train_seconds"] for e in result.epochs),
            "history": result.epochs, "precision": result.precision, "selection": result.record["selection"],
            "started_ms": started, "ended_ms": int(time.time() * 1000),  # its real span, for MLflow's duration
            "seconds": time.perf_counter() - t0, "checkpoint": checkpoint}


def confirm_stage(ctx: "StudyContext", ray_session: Callable[[], ContextManager], *, progress: bool = True,
                  runs: list[tuple[str, int, int, TrialConfig]] | None = None) -> Path:
    """``Study.confirm``: the missing confirm runs as Ray tasks, inside ``ray_session()`` (the search's Ray,
    handed in by ``Study.confirm`` so that no stage imports another; entered only when there is something to
    train, since it imports and starts Ray)."""
    trials, _ = ctx.tables()
    planned = confirm_configs(ctx.spec, trials) if runs is None else runs
    if all(ctx.paths.confirm_result(run_name(m, r, s)).exists() for m, r, s, _ in planned) \
            and read_test_split(ctx.paths) is not None:
        fix_comparator(ctx.spec, ctx.paths, trials)
        for m, r, s, cfg in planned:  # a finished result trained under another configuration is redone
            if set_aside_if_stale(ctx.paths, run_name(m, r, s), cfg):
                break
        else:
            return ctx.paths.confirm  # nothing to train: no data to prepare, no Ray to start (study report)
    data = ctx.data(progress=progress)
    write_test_split(ctx.paths, data)  # what the report needs of the data, so it never prepares it
    with ray_session():
        return run_confirm(ctx.spec, ctx.paths, trials, data, progress=progress, runs=runs)


def run_confirm(spec: StudySpec, paths: StudyPaths, trials: pd.DataFrame, data, *, progress: bool = True,
                runs: list[tuple[str, int, int, TrialConfig]] | None = None) -> Path:
    """Run every missing confirm run (default: the spec's) as a Ray task; write each result as it finishes."""
    import ray

    paths.confirm.mkdir(parents=True, exist_ok=True)
    fix_comparator(spec, paths, trials)
    planned = confirm_configs(spec, trials) if runs is None else runs
    for m, r, s, cfg in planned:
        set_aside_if_stale(paths, run_name(m, r, s), cfg)
    todo = longest_first([(m, r, s, cfg) for m, r, s, cfg in planned
                          if not paths.confirm_result(run_name(m, r, s)).exists()], spec, trials)
    if not todo:
        return paths.confirm
    remote = ray.remote(num_cpus=spec.resources.cpu, num_gpus=spec.resources.gpu,
                        max_retries=spec.max_failures)(confirm_one)
    data_ref = ray.put(data)
    pending = {remote.remote(cfg, data_ref): (m, r, s) for m, r, s, cfg in todo}
    from study.progress import progress_bar

    bar = progress_bar(len(pending), "confirm runs", unit="run", enabled=progress)  # a line per run if no terminal
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        method, rank, seed = pending.pop(ready[0])
        result = ray.get(ready[0])
        checkpoint = result.pop("checkpoint", None)
        name = run_name(method, rank, seed)
        if checkpoint is not None:  # first: a .json without its .pt is an older run, never the reverse
            atomic_write_bytes(paths.confirm_model(name), checkpoint)
        write_confirm_result(paths, name, ConfirmResult(method=method, config_rank=rank, seed=seed, **result))
        bar.set_postfix_str(name, refresh=False)
        bar.update(1)
    bar.close()
    return paths.confirm


def fix_comparator(spec: StudySpec, paths: StudyPaths, trials: pd.DataFrame) -> str | None:
    """Fix, before any confirm run scores a test split, the arm the target is compared with on every test set:
    the competitor whose best search trial scored best on validation (the study's metric). Written once to
    ``<study>/comparator.json`` (``study.records.comparing``); the verdict, the pooled verdict and the projection
    read it, so
    no test score ever chooses the comparison. Returns the comparator (None without a target or a scored one)."""
    from study.records.comparing import read_comparator, write_comparator

    if paths.comparator.is_file():
        return read_comparator(paths)
    roles = spec.arm_set.roles()
    try:
        chosen = confirmed_trials(spec, trials)
    except NoScoredTrial:
        return None
    best = chosen[(chosen["config_rank"] == 1) & chosen["method"].map(lambda m: roles.get(m) == "competitor")]
    best = best.dropna(subset=[spec.metric])
    if best.empty or spec.arm_set.target is None:
        return None
    values = {str(row["method"]): float(row[spec.metric]) for _, row in best.iterrows()}
    comparator = (max if spec.mode == "max" else min)(values, key=values.get)
    write_comparator(paths, comparator, f"the competitor whose best search trial scored best on {spec.metric} "
                                        f"({spec.mode}), before any test split was scored", values)
    return comparator


def longest_first(runs: list[tuple[str, int, int, TrialConfig]], spec: StudySpec,
                  trials: pd.DataFrame) -> list[tuple[str, int, int, TrialConfig]]:
    """``runs`` ordered by expected training time, longest first (ties, and runs without a timed source trial,
    keep their order). Ray starts tasks in the order they are submitted: submitted last, a long run trains alone
    while the other slots idle (the 12-epoch Flickr8k study queued its three ~27-min attention runs behind
    twelve ~9-min runs). Expected time: the source trial's training seconds per epoch x the run's epochs. The
    order changes no result: each run has its own seed and its own process."""
    if "train_seconds" not in trials or "epochs" not in trials:
        return runs
    # The epochs the source trial trained (a searched epochs, its schedule length, is a column of the chosen rows).
    trained = trials[["trial_id", "train_seconds", "epochs"]].rename(columns={"epochs": "trained_epochs"})
    timed = confirmed_trials(spec, trials).merge(trained, on="trial_id")
    per_epoch = {(row.method, int(row.config_rank)): row.train_seconds / row.trained_epochs
                 for row in timed.itertuples() if row.trained_epochs and not missing(row.train_seconds)}
    return sorted(runs, key=lambda run: -per_epoch.get((run[0], run[1]), 0.0) * run[3].epochs)


def set_aside_if_stale(paths: StudyPaths, name: str, cfg: TrialConfig) -> bool:
    """Move a finished confirm run whose configuration is not the one the stage now trains under that name
    (``confirm/stale/``, with its model and per-image CSV) so that it is trained again; True if it was.

    Written by other code (a bug once trained every confirm run as ``init``; a search re-ranked since), such a
    result would be reported under a method it is not. Fields only one side knows (a field added to the
    config since) are not compared."""
    path = paths.confirm_result(name)
    if not path.is_file():
        return False
    wanted = json.loads(json.dumps(cfg.model_dump(mode="json", by_alias=True, exclude={"dataset"})))
    try:
        stored = read_confirm_result(path).config
        differs = sorted(k for k in stored.keys() & wanted.keys() if stored[k] != wanted[k])
        why = "trained with " + ", ".join(f"{k}={stored[k]!r} (now {wanted[k]!r})" for k in differs)
    except RecordError as err:  # a damaged result scores nothing: kept aside, and the run trained again
        differs, why = ["unreadable"], f"damaged ({err})"
    if not differs:
        return False
    stale = paths.confirm / "stale"
    stale.mkdir(exist_ok=True)
    for old in (path, paths.confirm_model(name), path.with_suffix(".per_image.csv")):
        if old.exists():
            old.replace(stale / old.name)
    log.warning("confirm run %s was %s; set aside in %s and trained again", name, why, stale)
    return True
