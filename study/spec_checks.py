"""The checks of a study spec that look across its fields: a ``when`` condition must be able to hold, each fixed
value and each end of a range must make a valid trial, and each of ``search.points_to_evaluate`` must be a point of
the space. ``study.spec`` runs them when a spec loads, so a mistake fails before Ray starts, not hours into a study.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from pydantic import ValidationError

from study.config import TrialConfig

if TYPE_CHECKING:
    from study.spec import Param


def check_when(where: str, key: str, values: list[Any], fixed: dict[str, Any], space: dict[str, Param],
                earlier: list[str]) -> None:
    """A condition must be able to hold: it names a fixed or an earlier searched parameter (parameters are
    sampled in file order), and each value is one that parameter can take. Otherwise the conditional
    parameter would silently never be sampled."""
    if key in fixed:
        allowed: list[Any] = [fixed[key]]
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"{where}: {bad} never holds: {key} is fixed to {fixed[key]!r}")
        return
    if key not in space:
        raise ValueError(f"{where}: {key!r} is neither searched nor fixed")
    if key not in earlier:
        raise ValueError(f"{where}: {key!r} is searched after this parameter; list it earlier in space "
                         "(parameters are sampled in file order)")
    param = space[key]
    if param.choice is not None:
        bad = [v for v in values if v not in param.choice]
        if bad:
            raise ValueError(f"{where}: {bad} not among the choices of space.{key}; allowed: {list(param.choice)}")
        return
    if param.kind in ("uniform", "loguniform"):
        # A continuous draw equals a given number with probability zero: the condition would never hold.
        raise ValueError(f"{where}: {key} is drawn from a continuous range ({param.kind}), so it never equals "
                         f"{values}; condition on a choice parameter, or make {key} a choice")
    desc = param.describe()
    bad = [v for v in values if not isinstance(v, (int, float)) or not desc["low"] <= v <= desc["high"]]
    if bad:
        raise ValueError(f"{where}: {bad} outside the range of space.{key} [{desc['low']}, {desc['high']}]")


def check_trial(values: dict[str, Any], where: str) -> None:
    try:
        TrialConfig.model_validate(values)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ValueError(f"{where}: {problems}") from None


def check_points(points: list[dict[str, Any]], fixed: dict[str, Any], space: dict[str, "Param"], trials: int,
                 arm_of: Callable[[dict[str, Any]], str | None] | None) -> None:
    """Each point to evaluate first names searched parameters only, with values their ranges allow and only where
    their ``when`` holds (a parameter it leaves out is drawn by the searcher), and no searcher gets more points
    than its ``trials``. With arms (``arm_of``: one searcher per arm), each point lies in one arm."""
    counts: dict[Any, int] = {}
    for i, point in enumerate(points):
        where = f"search.points_to_evaluate[{i}]"
        unknown = sorted(set(point) - set(space))
        if unknown:
            raise ValueError(f"{where}: {unknown} not searched (a point gives values of space: parameters; "
                             f"searched: {sorted(space)})")
        for name, value in point.items():
            param, sampled = space[name], {**fixed, **point}
            if not param.matches(sampled):
                raise ValueError(f"{where}: {name} is sampled only where {param.when}, which this point does not "
                                 "meet; leave it out")
            desc = param.describe()
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            allowed = value in desc["values"] if param.choice is not None else (
                number and desc["low"] <= value <= desc["high"])
            if not allowed:
                span = list(param.choice) if param.choice is not None else f"[{desc['low']}, {desc['high']}]"
                raise ValueError(f"{where}: {name} = {value!r} is outside space.{name} {span}")
            # Optuna replaces a queued value its distribution cannot take with a warning at run time: an int
            # parameter given 1.5, a quniform one off its step (issue 33, item 7).
            if param.kind == "int" and not isinstance(value, int):
                raise ValueError(f"{where}: {name} = {value!r} is not a whole number; space.{name} is an int range")
            if param.kind == "quniform" and abs((value - desc["low"]) / desc["step"]
                                                - round((value - desc["low"]) / desc["step"])) > 1e-9:
                raise ValueError(f"{where}: {name} = {value!r} is not on the grid of space.{name} (from "
                                 f"{desc['low']} in steps of {desc['step']})")
        group = "the search"
        if arm_of is not None:
            group = arm_of({**fixed, **point})
            if group is None:
                raise ValueError(f"{where}: lies in no arm (give the values that place it in one, e.g. inject:), "
                                 "since each arm has its own searcher")
        counts[group] = counts.get(group, 0) + 1
        if counts[group] > trials:
            raise ValueError(f"search.points_to_evaluate: more points for {group} than its {trials} trials")


def check_epochs(fixed: dict[str, Any], space: dict[str, "Param"], max_epochs: int, confirm_epochs: int | None) -> None:
    """``epochs`` is the length of a trial's schedule: searched (so validation chooses it per arm) or, by default,
    ``asha.max_epochs`` for every trial; never fixed, since ASHA and the confirm stage set it."""
    if "epochs" in fixed:
        raise ValueError("epochs is not a fixed parameter of a study: the search trains asha.max_epochs (ASHA stops "
                         "weak trials earlier) and the confirm stage confirm.epochs; set those, or search epochs in "
                         "space: to let validation choose each arm's schedule length")
    param = space.get("epochs")
    if param is None:
        return
    if param.choice is None or any(not isinstance(v, int) or isinstance(v, bool) for v in param.choice):
        raise ValueError("space.epochs: give the schedule lengths as a choice of whole numbers")
    if max(param.choice) > max_epochs:
        raise ValueError(f"space.epochs: {max(param.choice)} exceeds asha.max_epochs ({max_epochs})")
    if confirm_epochs is not None:
        raise ValueError("confirm.epochs: with epochs searched, each confirm run trains its configuration's own "
                         "epochs; leave confirm.epochs out")


def check_values(fixed: dict[str, Any], space: dict[str, "Param"], max_epochs: int, confirm_epochs: int | None,
                 beam_size: int) -> None:
    """Every fixed value, every choice value, both ends of every range and the confirm stage's settings make a
    valid TrialConfig: found now, not by a trial (or the confirm stage) after hours of search."""
    probe = {**fixed, "epochs": max_epochs}
    check_trial(probe, "fixed" if max_epochs <= 1000 else "asha.max_epochs")
    for name, param in space.items():
        for value in param.choice or []:
            check_trial({**probe, name: value}, f"space.{name}: value {value!r}")
        if param.choice is None:
            described = param.describe()
            for end in ("low", "high"):
                value = described[end]
                if name in ("layers", "hidden", "embed", "attention_dim", "batch_size", "min_count", "max_len"):
                    value = round(value)
                check_trial({**probe, name: value}, f"space.{name}: {param.kind} {end} end {described[end]!r}")
    check_trial({**probe, "epochs": confirm_epochs or max_epochs, "beam_size": beam_size}, "confirm")
