"""The study spec: a search-space YAML loaded into a validated, frozen model.

A spec says which dataset to prepare, which trial parameters are fixed, which are searched (and over what
range, possibly conditionally), how to search (Optuna TPE / random / grid), how ASHA stops trials, what each
trial may use, where results go and where MLflow tracks them. Everything is checked before Ray starts:
an unknown key, a wrong type, a parameter that ``TrialConfig`` does not have, or an impossible range fails
with the file, the key path and what is allowed.

Parameter forms in ``space``::

    cell: {choice: [lstm, gru, lstm_peephole]}
    lr: {loguniform: [1.0e-4, 1.0e-2]}
    dropout: {uniform: [0.0, 0.5]}
    layers: {int: [1, 4]}
    hidden: {quniform: [128, 1024, 128]}      # low, high, step
    attention_dim: {choice: [128, 256], when: {inject: attention}}   # only sampled where inject == attention
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from analysis.metric_table import METRICS, POINTS
from study.arms import Arms
from study.config import (
    SEED_MAX,
    ConfigError,
    DatasetConfig,
    ShapesDataset,
    StrictModel,
    TrialConfig,
    read_yaml,
    validate_model,
)
from study.config_errors import did_you_mean
from study.spec_checks import check_epochs, check_points, check_values, check_when

TRIAL_FIELDS = set(TrialConfig.model_fields) - {"dataset"}

# What a trial reports to Tune each epoch (study.trial.training.run_trial's metrics). Kept here, not in study.tuning,
# so a spec is checked against it without importing Ray.
REPORTED = ("epoch", "train_loss", "val_loss", "val_bpc", "val_CIDEr-D", "val_BLEU-4", "current_lr", "train_seconds",
            "epoch_seconds", "tokens_per_second", "params",
            # where an epoch's seconds go (study profile): train_seconds includes data_seconds
            "data_seconds", "val_loss_seconds", "decode_seconds", "metric_seconds")


# The reported metrics a study may optimise, and the mode that means "better" for each: a spec that asks for the
# other mode would rank the worst trials first.
METRIC_MODES = {name: metric.mode for name, metric in METRICS.items() if name in REPORTED}


class Param(StrictModel):
    """One searched parameter: exactly one of the distribution keys, plus an optional condition."""

    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    int_: tuple[int, int] | None = Field(None, alias="int")
    quniform: tuple[float, float, float] | None = None
    when: dict[str, list[Any] | Any] | None = Field(
        None, description="sample only where other (earlier) parameters have these values"
    )

    model_config = StrictModel.model_config | {"populate_by_name": True}

    @model_validator(mode="after")
    def _exactly_one(self) -> "Param":
        kinds = [k for k in ("choice", "uniform", "loguniform", "int_", "quniform") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of choice, uniform, loguniform, int, quniform")
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs at least one value")
        if self.choice is not None:
            repeated = [v for i, v in enumerate(self.choice) if v in self.choice[:i]]
            if repeated:
                # A repeated value is a grid point counted twice: the dry run promised trials that never ran.
                raise ValueError(f"choice lists {repeated} more than once; give each value once")
        for name in ("uniform", "loguniform", "int_", "quniform"):
            rng = getattr(self, name)
            if rng is not None and not rng[0] < rng[1]:
                raise ValueError(f"{name.rstrip('_')}: low must be below high, got {list(rng)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform: low must be positive")
        if self.quniform is not None and self.quniform[2] <= 0:
            raise ValueError("quniform: the step must be positive")
        return self

    @property
    def kind(self) -> str:
        for name in ("choice", "uniform", "loguniform", "int_", "quniform"):
            if getattr(self, name) is not None:
                return name.rstrip("_")
        raise AssertionError("validated to have one kind")

    def describe(self) -> dict[str, Any]:
        """A plain description for logs and the analysis' edge checks."""
        if self.choice is not None:
            return {"type": "choice", "values": list(self.choice)}
        low, high, *step = getattr(self, self.kind if self.kind != "int" else "int_")
        out = {"type": self.kind, "low": low, "high": high}
        if step:
            out["step"] = step[0]
        return out

    def matches(self, sampled: dict[str, Any]) -> bool:
        """Whether the condition holds for the values sampled so far."""
        for key, allowed in (self.when or {}).items():
            allowed = allowed if isinstance(allowed, list) else [allowed]
            if sampled.get(key) not in allowed:
                return False
        return True


class SearchSettings(StrictModel):
    algorithm: Literal["optuna", "random", "grid"] = Field(
        "optuna", description="optuna (TPE), random, or grid (choice parameters only)")
    trials: int = Field(12, ge=1, description="total trials (split equally between methods when stratified)")
    max_concurrent: int | None = Field(None, ge=1, description="trials at once (default: what resources allow)")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="searcher seed")
    time_budget_h: float | None = Field(
        None, gt=0, description="wall-clock hours for the search, summed over resumes; trials still running when "
        "it is spent are stopped and ranked on the epochs they finished (None: until every trial has run)")
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list, description="configurations each searcher proposes first (the best known so far, say), "
        "as parameter: value; they count as trials of their arm, and what a point leaves out is drawn as usual")
    epochs_per_arm: int | None = Field(
        None, ge=1, description="search compute of each arm, in trial-epochs: an arm proposes no new trial once its "
        "trials trained this many epochs, and its running trials stop there (ranked on the epochs they finished): "
        "every arm gets the same compute, not just the same trial count (None: trials alone)")


class AshaSettings(StrictModel):
    enabled: bool = True
    max_epochs: int = Field(10, ge=1, description="epochs of a trial that is never stopped (trial epochs)")
    grace_period: int = Field(2, ge=1, description="epochs before a trial can be stopped")
    reduction_factor: float = Field(3.0, gt=1.0, description="keep 1/reduction_factor at each rung")
    per_method: bool = Field(True, description="with stratify: inject, each method's trials are compared only with "
                                               "each other (same rungs and fractions for every method); false: one "
                                               "bracket for all, so a method that learns fast early gets more epochs")

    @model_validator(mode="after")
    def _grace_below_max(self) -> "AshaSettings":
        if self.grace_period > self.max_epochs:
            raise ValueError(f"grace_period ({self.grace_period}) exceeds max_epochs ({self.max_epochs})")
        return self


class Resources(StrictModel):
    cpu: float = Field(1.0, gt=0, description="CPUs per trial; torch uses this many threads")
    gpu: float = Field(0.0, ge=0, le=8, description="GPUs per trial; a fraction lets small trials share one")
    wait_for_nodes_min: float = Field(
        10.0, ge=0, description="on a cluster (--address): how long to wait for a node that can hold one trial (the "
        "autoscaler adding it) before the study is refused")


class Tracking(StrictModel):
    uri: str | None = Field(None, description="MLflow tracking URI (default: sqlite file under storage)")
    experiment: str | None = Field(None, description="MLflow experiment (default: the study name)")


class ConfirmSettings(StrictModel):
    top_k: int = Field(1, ge=1, description="best configurations of each arm to retrain")
    seeds: int = Field(3, ge=1, description="seeds per configuration")
    epochs: int | None = Field(None, ge=1, description="epochs for the retrain (default: asha.max_epochs, or each "
                                                      "configuration's own when epochs is searched)")
    select: Literal["best_val", "last"] = Field(
        "best_val", description="which epoch's model each confirm run is scored with: the one with the best "
        "validation score (the study's metric, decoded as the test is), or the last; one rule for every arm")
    val_images: int | None = Field(None, ge=1, description="with select: best_val, the val photos the epoch is "
                                   "chosen on (None: the whole val split)")
    beam_size: int = Field(3, ge=1)
    margin_points: float | None = Field(None, ge=0, description="equivalence margin on CIDEr-D in points (x100, as "
                                        "every score reads; default 2): target - comparator above -margin competes")
    margin: float | None = Field(None, ge=0, description="the margin on the 0..1 scale, as specs before points gave "
                                 "it: still read, so a stored study judges as it did; write margin_points")
    max_seeds: int | None = Field(
        None, ge=1, description="plan `study decide` before the first look: it may add seeds up to this many per "
        "method, and every look (this one included) uses a Bonferroni level so the error rate stays 5%")

    @model_validator(mode="after")
    def _max_seeds_covers_seeds(self) -> "ConfirmSettings":
        if self.max_seeds is not None and self.max_seeds < self.seeds:
            raise ValueError(f"max_seeds ({self.max_seeds}) is below seeds ({self.seeds})")
        if self.margin is not None and self.margin_points is not None:
            raise ValueError("margin (the 0..1 scale) and margin_points both given: keep margin_points")
        return self

    @property
    def equivalence_margin(self) -> float:
        """The margin on the 0..1 scale the analysis computes on: ``margin``, or ``margin_points`` / 100."""
        points = 2.0 if self.margin_points is None else self.margin_points  # none given: 2 CIDEr-D points
        return self.margin if self.margin is not None else points / POINTS


class StudySpec(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="study name: letters, digits, _ . -")
    description: str = ""
    dataset: DatasetConfig = Field(default_factory=ShapesDataset)
    fixed: dict[str, Any] = Field(default_factory=dict, description="TrialConfig fields held constant")
    space: dict[str, Param] = Field(default_factory=dict, description="TrialConfig fields searched")
    metric: str = Field("val_CIDEr-D", description="reported metric to optimise")
    mode: Literal["max", "min"] = "max"
    search: SearchSettings = Field(default_factory=SearchSettings)
    stratify: Literal["inject"] | None = Field(
        None, description="inject: each injection method gets its own searcher and the same number of trials "
        "(the shorthand for arms: {m: {inject: m}} for every method m)")
    arms: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="what the study compares: each arm a named restriction of the space "
        "(parameter: value or [choices]) with its own searcher, ASHA bracket, confirm runs and verdict row")
    target: str | None = Field(None, description="the arm the question asks about (with arms:)")
    asha: AshaSettings = Field(default_factory=AshaSettings)
    resources: Resources = Field(default_factory=Resources)
    max_failures: int = Field(2, ge=0, description="retries of a failed trial, from its last checkpoint")
    storage: str = Field("runs", description="results folder (relative to the working directory) or an s3:// URI")
    tracking: Tracking = Field(default_factory=Tracking)
    confirm: ConfirmSettings = Field(default_factory=ConfirmSettings)

    @model_validator(mode="after")
    def _check_parameters(self) -> "StudySpec":
        for where, keys in (("fixed", self.fixed), ("space", self.space)):
            unknown = sorted(set(keys) - TRIAL_FIELDS)
            if unknown:  # one key path first, so the message gets its file line (study.config_errors)
                raise ValueError("; ".join(f"{where}.{name}: unknown trial parameter{did_you_mean(name, TRIAL_FIELDS)}"
                                           for name in unknown) + f"; allowed: {', '.join(sorted(TRIAL_FIELDS))}")
        both = sorted(set(self.fixed) & set(self.space))
        if both:
            raise ValueError(f"{both} are both fixed and searched; keep one")
        if self.stratify == "inject" and not self.methods:
            raise ValueError("stratify: inject needs space.inject as a choice of methods")
        self.arm_set  # checks the arms (outside the space, overlapping, no target): ValueError naming the arm
        check_epochs(self.fixed, self.space, self.asha.max_epochs, self.confirm.epochs)
        if "precision" in self.space:
            raise ValueError("precision is one setting for the whole study (every trial and confirm run alike); "
                             "set it in fixed: (auto, fp32 or bf16), not in space:")
        if self.search.algorithm == "grid":
            bad = [n for n, p in self.space.items() if p.choice is None]
            if bad:
                raise ValueError(f"grid search needs choice parameters only; not choices: {bad}")
        check_values(self.fixed, self.space, self.asha.max_epochs, self.confirm.epochs, self.confirm.beam_size)
        if self.metric not in METRIC_MODES:
            raise ValueError(f"metric: {self.metric!r} is not a metric a trial reports; allowed: "
                             f"{', '.join(METRIC_MODES)}")
        if self.mode != METRIC_MODES[self.metric]:
            raise ValueError(f"mode: {self.mode!r} ranks the worst trials first for {self.metric} "
                             f"(better is {METRIC_MODES[self.metric]}); use mode: {METRIC_MODES[self.metric]}")
        check_points(self.search.points_to_evaluate, self.fixed, self.space,
                     self.trials_per_method if self.stratified else self.search.trials,
                     self.arm_set.of_config if self.stratified else None)
        order = list(self.space)
        for name, param in self.space.items():
            for key, values in (param.when or {}).items():
                check_when(f"space.{name}.when.{key}", key, values if isinstance(values, list) else [values],
                            self.fixed, self.space, order[:order.index(name)])
        return self

    @property
    def arm_set(self) -> Arms:
        """The arms (``stratify: inject`` expanded), checked: see study.arms."""
        return Arms.of(self.arms, self.target, self.stratify, self.fixed, self.space)

    @property
    def stratified(self) -> bool:
        """Whether trials are grouped into arms (each its own searcher, bracket and verdict row)."""
        return bool(self.arms) or self.stratify == "inject"

    @property
    def methods(self) -> list[str]:
        """The arm names, in display order (``stratify: inject``: the inject values). The frames' ``method``
        column holds these names."""
        return self.arm_set.names

    @property
    def injects(self) -> list[str]:
        """Every inject value a trial of this study can have."""
        param = self.space.get("inject")
        if param is not None and param.choice is not None:
            return list(param.choice)
        return [self.fixed["inject"]] if "inject" in self.fixed else []

    @property
    def trials_per_method(self) -> int:
        return math.ceil(self.search.trials / max(1, len(self.methods)))

    def run_name(self, sampled: dict[str, Any]) -> str:
        """``init-lstm-1x512-word``, led by the arm's name where it is not the method's (``seed-init-lstm-...``)."""
        name, arm = self.trial_config(sampled).run_name, self.arm_of(sampled)
        return name if arm is None or name.startswith(f"{arm}-") else f"{arm}-{name}"

    def arm_of(self, config: dict[str, Any]) -> str | None:
        """The arm a trial's configuration lies in (None for a study without arms)."""
        return self.arm_set.of_config({**self.fixed, **config})

    def with_precision(self, precision: str) -> "StudySpec":
        """This spec with ``fixed.precision`` set: how a study pins what ``auto`` resolved to (trial.precision)."""
        return self.model_copy(update={"fixed": {**self.fixed, "precision": precision}})

    def trial_config(self, sampled: dict[str, Any]) -> TrialConfig:
        """The full trial config of a sampled point."""
        values = {**self.fixed, "epochs": self.asha.max_epochs, **sampled, "dataset": self.dataset}
        return TrialConfig.model_validate(values)

    def space_description(self) -> dict[str, dict[str, Any]]:
        return {name: param.describe() for name, param in self.space.items()}


def load_spec(path: Path, *, check_paths: bool = True, storage: str | None = None,
              tracking_uri: str | None = None, name: str | None = None, base: Path | None = None) -> StudySpec:
    """Load a search-space YAML. Relative dataset paths are taken from ``base`` (default: the spec's folder; a
    study's own copy of its spec passes the folder the original was in), a relative storage folder from the
    working directory. ``storage``, ``tracking_uri`` and ``name`` override the file's values (``name``: a study
    started with ``study run --new`` is named NAME-2 ... while its file still says NAME)."""
    path = Path(path).resolve()
    data = read_yaml(path)
    if name is not None:
        data["name"] = name
    if storage is not None:
        data["storage"] = storage
    if tracking_uri is not None:
        data["tracking"] = {**(data.get("tracking") or {}), "uri": tracking_uri}
    base = Path(base).resolve() if base is not None else path.parent
    dataset = data.get("dataset")
    if isinstance(dataset, dict):
        dataset = dict(dataset)
        for key in ("json", "images_root", "cache_dir"):
            if isinstance(dataset.get(key), str) and not Path(dataset[key]).expanduser().is_absolute():
                dataset[key] = str((base / dataset[key]).resolve())
        data["dataset"] = dataset
    storage = data.get("storage")
    if isinstance(storage, str) and "://" not in storage and not Path(storage).expanduser().is_absolute():
        data["storage"] = str((Path.cwd() / storage).resolve())
    elif storage is None:
        data["storage"] = str((Path.cwd() / "runs").resolve())
    return validate_model(StudySpec, data, str(path), check_paths=check_paths)


def storage_is_remote(storage: str) -> bool:
    return "://" in storage


__all__ = ["ConfigError", "METRIC_MODES", "REPORTED", "Param", "StudySpec", "load_spec", "storage_is_remote"]
