"""The search: a study's space as Optuna define-by-run, one Optuna study per injection method (so each gets the
same number of trials), and ASHA (one per method, so each promotes the same fraction of its trials). What the
searchers did is written out for optuna-dashboard by ``study.tuning.optuna_export``.

The searchers' state is saved as JSON (never a pickle): storage is often a shared bucket, and unpickling a file
from there runs whatever code it holds.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import Searcher

from study.arms import Arm
from study.records.files import atomic_write_text
from study.spec import StudySpec
from study.tuning.budget import ArmBudget

log = logging.getLogger(__name__)


def _suggest(trial, name: str, param) -> Any:
    kind = param.kind
    if kind == "choice":
        return trial.suggest_categorical(name, list(param.choice))
    if kind == "uniform":
        return trial.suggest_float(name, *param.uniform)
    if kind == "loguniform":
        return trial.suggest_float(name, *param.loguniform, log=True)
    if kind == "int":
        return trial.suggest_int(name, *param.int_)
    low, high, step = param.quniform
    if all(float(v).is_integer() for v in (low, high, step)):
        return trial.suggest_int(name, int(low), int(high), step=int(step))
    return trial.suggest_float(name, low, high, step=step)


def define_by_run(spec: StudySpec, arm: Arm | None, trial) -> dict[str, Any]:
    """Sample one point on an Optuna trial: conditional parameters only where their ``when`` holds, the arm's
    parameters at its value or among its choices."""
    allowed = arm.allowed if arm is not None else {}
    sampled: dict[str, Any] = {}
    for name, param in spec.space.items():
        if not param.matches({**spec.fixed, **sampled}):
            continue
        values = allowed.get(name)
        if values is not None and len(values) == 1:
            sampled[name] = values[0]
        elif values is not None:
            sampled[name] = trial.suggest_categorical(name, values)
        else:
            sampled[name] = _suggest(trial, name, param)
    return sampled


def _sampler(spec: StudySpec, seed: int, arm: Arm | None):
    import optuna

    if spec.search.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.search.algorithm == "grid":
        allowed = arm.allowed if arm is not None else {}
        grid = {n: list(allowed.get(n, p.choice)) for n, p in spec.space.items() if len(allowed.get(n, [0, 0])) > 1}
        return optuna.samplers.GridSampler(grid, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(5, spec.trials_per_method // 2)))


class GroupSearch:
    """One Optuna study (TPE, random or grid) proposing the trials of one group: one injection method when the
    study is stratified, else the whole space. Its state is plain data (``state`` / ``from_state``)."""

    def __init__(self, spec: StudySpec, arm: Arm | None, seed: int, points: list[dict[str, Any]] = ()):
        import optuna

        # Optuna logs "A new study created ..." at INFO for each of these internal studies (24 lines on the
        # quickstart); the study's own lines say what the searchers do.
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.spec, self.arm, self.seed = spec, arm, seed
        self.fixed = arm.fixed() if arm is not None else {}
        self.study = optuna.create_study(direction="maximize" if spec.mode == "max" else "minimize",
                                         sampler=_sampler(spec, seed, arm))
        self.running: dict[str, int] = {}  # Tune trial id -> Optuna trial number, until told
        self.best: dict[str, float] = {}  # best metric so far of each running trial
        self.enqueue(points)

    def enqueue(self, points: list[dict[str, Any]]) -> None:
        """The points the next asks propose, in order (Optuna's queue: ask pops them before sampling)."""
        for point in points:
            self.study.enqueue_trial({k: v for k, v in point.items() if k not in self.fixed})

    def suggest(self, trial_id: str) -> dict[str, Any]:
        trial = self.study.ask()
        self.running[trial_id] = trial.number
        return define_by_run(self.spec, self.arm, trial)

    def result(self, trial_id: str, value: Any) -> None:
        if trial_id in self.running and _finite(value):
            old = self.best.get(trial_id)
            better = old is None or (value > old if self.spec.mode == "max" else value < old)
            self.best[trial_id] = float(value) if better else old

    def complete(self, trial_id: str, error: bool) -> None:
        """Tell Optuna the trial's best epoch (the leaderboard's definition of a trial's score); an errored
        trial teaches the sampler nothing."""
        from optuna.trial import TrialState

        number = self.running.pop(trial_id, None)
        best = self.best.pop(trial_id, None)
        if number is None:
            return
        if error:
            self.study.tell(number, state=TrialState.FAIL)
        elif best is None:
            self.study.tell(number, state=TrialState.PRUNED)
        else:
            self.study.tell(number, best)

    def state(self) -> dict[str, Any]:
        from optuna.distributions import distribution_to_json
        from optuna.trial import TrialState

        # Points still queued (WAITING) are left out: the spec holds them, and from_state queues those not asked.
        trials = [{"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
                   "distributions": {k: json.loads(distribution_to_json(d)) for k, d in t.distributions.items()},
                   "system_attrs": t.system_attrs, "user_attrs": t.user_attrs}
                  for t in self.study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
        return {"seed": self.seed, "trials": trials, "running": self.running, "best": self.best}

    @classmethod
    def from_state(cls, spec: StudySpec, arm: Arm | None, state: dict[str, Any],
                   points: list[dict[str, Any]] = ()) -> "GroupSearch":
        """Rebuild the Optuna study from its told and running trials, then queue the ``points`` not asked yet
        (points go first, so the first n trials were the first n points). The sampler is seeded with (seed,
        trials so far): a fresh sampler with the first seed would propose the study's first points again."""
        import numpy as np
        from optuna.distributions import json_to_distribution
        from optuna.trial import TrialState, create_trial

        trials = sorted(state["trials"], key=lambda t: t["number"])
        seed = int(np.random.SeedSequence([int(state["seed"]), len(trials)]).generate_state(1)[0])
        group = cls(spec, arm, seed)
        group.seed = int(state["seed"])
        for t in trials:
            trial_state = TrialState[t["state"]]
            group.study.add_trial(create_trial(
                state=trial_state, params=t["params"],
                value=t["value"] if trial_state == TrialState.COMPLETE else None,
                distributions={k: json_to_distribution(json.dumps(d)) for k, d in t["distributions"].items()},
                system_attrs=t["system_attrs"], user_attrs=t["user_attrs"]))
        numbers = [t.number for t in group.study.get_trials(deepcopy=False)]
        if numbers != [t["number"] for t in trials]:
            raise ValueError(f"searcher state: trial numbers {[t['number'] for t in trials]} are not 0..n-1")
        group.running = {str(k): int(v) for k, v in state["running"].items()}
        group.best = {str(k): float(v) for k, v in state["best"].items()}
        group.enqueue(list(points)[len(trials):])
        return group


def _newest_readable_state(path: Path) -> dict[str, Any]:
    """The searcher state in ``path``, or, when it is empty or torn (written by a version that did not write it
    whole, on a full disk), the newest complete ``searcher-state-*.json`` beside it; the trials Tune restores that
    an older state does not know are then left out of the searchers' counts (said)."""
    candidates = [path] + sorted((p for p in path.parent.glob("searcher-state-*.json") if p != path),
                                 key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in candidates:
        try:
            state = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if candidate != path:
            log.warning("%s is empty or torn (a full disk?): the searchers continue from %s", path, candidate)
        return state
    raise ValueError(f"{path} is empty or torn and no complete searcher state is beside it: the study's searchers "
                     "cannot be restored (start a new study: study run SPEC --new)")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class StudySearcher(Searcher):
    """Tune's searcher for a study: with ``stratify: inject`` one ``GroupSearch`` per injection method and the
    same number of trials each (so no method wins by getting more tuning; suggestions go round-robin to the
    method with the fewest trials so far), else one ``GroupSearch`` for the whole space.

    Tune saves a searcher's state into the storage folder for ``study resume``. This one saves it as JSON (the
    trials told to each Optuna study) and never unpickles anything: storage is often a shared bucket, and
    unpickling a file from there runs whatever code the file holds. Ray's own ``OptunaSearch`` pickles its
    whole state, which is why it is not used here.
    """

    CKPT_FILE_TMPL = "searcher-state-{}.json"  # Tune's restore globs this: an old .pkl is never opened

    def __init__(self, spec: StudySpec, budget: ArmBudget | None = None):
        super().__init__(metric=spec.metric, mode=spec.mode)
        self.spec = spec
        self.budget = budget if budget is not None else ArmBudget(spec.search.epochs_per_arm)
        self.groups = {key: GroupSearch(spec, arm, spec.search.seed + i, self.points_of(key))
                       for i, (key, arm) in enumerate(self.group_arms().items())}
        self.per_group = spec.trials_per_method if spec.stratified else spec.search.trials
        self.counts = {key: 0 for key in self.groups}
        self.owner: dict[str, str] = {}  # Tune trial id -> group

    def group_arms(self) -> dict[str, Arm | None]:
        return dict(self.spec.arm_set.arms) if self.spec.stratified else {"all": None}

    def points_of(self, group: str) -> list[dict[str, Any]]:
        """The spec's points to evaluate first that this group proposes (an arm's own, when there are arms)."""
        points = self.spec.search.points_to_evaluate
        return [p for p in points if group == "all" or self.spec.arm_of(p) == group]

    def suggest(self, trial_id: str):
        unspent = [g for g in self.groups if self.counts[g] < self.per_group and not self.budget.exhausted(g)]
        if not unspent:
            return Searcher.FINISHED
        # An arm whose running trials may spend the rest of its budget waits (None: Tune asks again later).
        open_groups = [g for g in unspent if self.budget.room(g, len(self.groups[g].running))]
        if not open_groups:
            return None
        group = min(open_groups, key=lambda g: (self.counts[g], self.budget.spent(g)))
        config = self.groups[group].suggest(trial_id)
        self.counts[group] += 1
        self.owner[trial_id] = group
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.owner:
            self.budget.record(self.owner[trial_id], trial_id, result.get("epoch"))
            self.groups[self.owner[trial_id]].result(trial_id, result.get(self.spec.metric))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.owner:
            group = self.groups[self.owner[trial_id]]
            group.result(trial_id, (result or {}).get(self.spec.metric))
            group.complete(trial_id, error)

    def save(self, checkpoint_path: str) -> None:
        state = {"format": 1, "counts": self.counts, "owner": self.owner, "budget": self.budget.epochs,
                 "groups": {key: group.state() for key, group in self.groups.items()}}
        # Written whole or not at all: Tune renames this file over the last state when it exists, so a write cut
        # short (a full disk) must leave no file rather than a torn one.
        atomic_write_text(Path(checkpoint_path), json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        state = _newest_readable_state(Path(checkpoint_path))
        arms = self.group_arms()
        if state.get("format") != 1 or set(state["groups"]) != set(arms):
            raise ValueError(f"{checkpoint_path}: not this study's searcher state (groups {sorted(arms)})")
        self.groups = {key: GroupSearch.from_state(self.spec, arms[key], state["groups"][key], self.points_of(key))
                       for key in arms}
        self.counts = {key: int(state["counts"][key]) for key in arms}
        self.owner = {str(k): str(v) for k, v in state["owner"].items()}
        self.budget.load(state.get("budget", {}))


def total_trials(spec: StudySpec) -> int:
    """The most trials the search runs (with ``search.epochs_per_arm`` an arm may end with fewer)."""
    return spec.trials_per_method * len(spec.methods) if spec.stratified else spec.search.trials


def build_scheduler(spec: StudySpec, budget: ArmBudget | None = None) -> FIFOScheduler:
    if spec.stratified and (spec.asha.per_method or spec.search.epochs_per_arm):
        return PerMethodASHA(spec, budget or ArmBudget(spec.search.epochs_per_arm))
    if not spec.asha.enabled:
        return FIFOScheduler()
    return _asha(spec)


def _asha(spec: StudySpec) -> ASHAScheduler:
    # Time is the trial's own epoch, not Tune's count of its results: a trial resumed from a checkpoint newer
    # than Tune's snapshot knew (see restore_source) would otherwise reach ASHA's rungs at the wrong epochs.
    return ASHAScheduler(time_attr="epoch", metric=spec.metric, mode=spec.mode,
                         max_t=spec.asha.max_epochs, grace_period=spec.asha.grace_period,
                         reduction_factor=spec.asha.reduction_factor)


class PerMethodASHA(FIFOScheduler):
    """One ASHA per arm (with ``stratify: inject``, per injection method): a trial's score at a rung is compared
    only with its own arm's trials, and an arm's trials stop when the arm has spent its search budget.

    With a single ASHA over all trials, a method that learns fast in the first epochs (on Flickr8k: init) wins
    the early rungs and gets the long runs, while one that starts slowly (pre, par) is cut after an epoch or
    two, so the search would favour the very method the study asks about. Here every arm promotes the same
    fraction of its own trials to each rung, as the stratified searcher gives each the same number of trials,
    and ``search.epochs_per_arm`` gives each the same trial-epochs. Trials run in the one shared queue (FIFO);
    only the stop decisions are per arm.
    """

    def __init__(self, spec: StudySpec, budget: ArmBudget | None = None):
        super().__init__()
        self._spec = spec
        self._metric, self._mode = spec.metric, spec.mode
        self.budget = budget if budget is not None else ArmBudget(spec.search.epochs_per_arm)
        self.brackets: dict[str, FIFOScheduler] = {}  # arm -> its ASHA (FIFO with asha.enabled false)

    def _arm(self, trial) -> str:
        return str(self._spec.arm_of(trial.config) or trial.config.get("inject", ""))

    def _asha_of(self, trial) -> FIFOScheduler:
        arm = self._arm(trial)
        if arm not in self.brackets:
            self.brackets[arm] = _asha(self._spec) if self._spec.asha.enabled else FIFOScheduler()
        return self.brackets[arm]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        return not (metric or mode)  # the spec set both; a second metric would be ambiguous, as for ASHA itself

    def on_trial_add(self, tune_controller, trial) -> None:
        self._asha_of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = self._asha_of(trial).on_trial_result(tune_controller, trial, result)
        arm = self._arm(trial)
        self.budget.record(arm, trial.trial_id, result.get("epoch"))
        return FIFOScheduler.STOP if self.budget.exhausted(arm) else decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._asha_of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._asha_of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "Using ASHA per arm: " + ", ".join(
            f"{arm} stopped {getattr(asha, '_num_stopped', 0)}, {self.budget.spent(arm)} trial-epochs"
            for arm, asha in sorted(self.brackets.items()))
