"""Arms: what a study compares, each a named restriction of the search space.

An arm is a set of trial parameters held to one value or to a subset of their choices, e.g. the seed's own model
``seed: {inject: init, cell: [lstm, lstm_peephole], seed_h: false}`` (the image only in c0 of the first LSTM
layer) beside Tanti et al.'s ``init: {inject: init, seed_h: true}``. Each arm has its own searcher, its own ASHA
bracket, its own search budget, its own confirm runs and its own row in the verdict; the spec names the
``target`` arm, the one the question asks about. ``stratify: inject`` is the shorthand for one arm per inject
value (``{init: {inject: init}, pre: {inject: pre}, ...}``) with the registry's target method as the target.

Everything here is plain data (no torch, no Ray): the spec validates arms when it loads, and the searcher, the
trial tables, the confirm stage and the report all ask the same :class:`Arms` which arm a configuration is in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from study.registry import METHODS

if TYPE_CHECKING:
    from study.spec import Param

# Colours for a second arm of the same injection method (the first takes the registry's colour).
_SPARE_COLORS = ("#8c564b", "#e377c2", "#17becf", "#bcbd22", "#393b79", "#637939")


@dataclass(frozen=True)
class Arm:
    """One arm: its name and, per restricted parameter, the values it allows (a one-element list: held fixed)."""

    name: str
    allowed: dict[str, list[Any]]
    inject: str

    def holds(self, config: dict[str, Any]) -> bool:
        """Whether a configuration (sampled values, fixed ones merged in) lies in this arm."""
        return all(key in config and config[key] in values for key, values in self.allowed.items())

    def fixed(self) -> dict[str, Any]:
        """The parameters this arm holds at one value."""
        return {key: values[0] for key, values in self.allowed.items() if len(values) == 1}


class Arms:
    """A study's arms in display order, with its target, built and checked from the spec's fields."""

    def __init__(self, arms: dict[str, Arm], target: str | None, fixed: dict[str, Any] | None = None):
        self.arms, self.target, self.fixed = arms, target, dict(fixed or {})

    @classmethod
    def of(cls, raw: dict[str, dict[str, Any]], target: str | None, stratify: str | None,
           fixed: dict[str, Any], space: dict[str, "Param"]) -> "Arms":
        """Check the spec's ``arms:`` (or expand ``stratify: inject``); a ``ValueError`` names the arm at fault."""
        if raw and stratify:
            raise ValueError("give arms: or stratify: inject, not both (stratify: inject is the shorthand for one "
                             "arm per inject value)")
        if stratify == "inject":
            inject = space.get("inject")
            methods = list(inject.choice) if inject is not None and inject.choice is not None else []
            raw = {m: {"inject": m} for m in methods}
            if target is None:
                target = next((m for m in methods if METHODS[m].role == "target"), None)
        if not raw:
            if target is not None:
                raise ValueError(f"target: {target!r} names an arm, but the spec has no arms:")
            return cls({}, None, fixed)
        arms = {name: _check_arm(name, restriction, fixed, space) for name, restriction in raw.items()}
        names = list(arms)
        for i, first in enumerate(names):
            for second in names[i + 1:]:
                shared = _overlap(arms[first], arms[second], fixed, space)
                if shared is not None:
                    raise ValueError(f"arms {first!r} and {second!r} overlap: a configuration such as {shared} lies "
                                     "in both; restrict one of them so that every trial belongs to one arm")
        if target is None:
            raise ValueError(f"name the target arm (target: one of {names}): the arm the question asks about")
        if target not in arms:
            raise ValueError(f"target: {target!r} is not an arm; arms: {names}")
        return cls(arms, target, fixed)

    def __bool__(self) -> bool:
        return bool(self.arms)

    @property
    def names(self) -> list[str]:
        return list(self.arms)

    def of_config(self, config: dict[str, Any]) -> str | None:
        """The arm a configuration lies in (None: in none of them, e.g. a trial of a study without arms)."""
        return next((name for name, arm in self.arms.items() if arm.holds(config)), None)

    def roles(self) -> dict[str, str]:
        """{arm: role} for the verdict: the target, a floor (an arm without the image), or a competitor."""
        return {name: "target" if name == self.target else "floor" if METHODS[arm.inject].role == "floor"
                else "competitor" for name, arm in self.arms.items()}

    def colors(self) -> dict[str, str]:
        """{arm: "#rrggbb"}: the inject method's colour, a spare one for a second arm of the same method."""
        out: dict[str, str] = {}
        spare = iter(_SPARE_COLORS)
        for name, arm in self.arms.items():
            color = METHODS[arm.inject].color
            out[name] = color if color not in out.values() else next(spare, "#000000")
        return out

    def describe(self, name: str) -> str:
        """What an arm is, in words a reader of the verdict needs: the method, the cells, which state the image
        seeds (for init)."""
        arm = self.arms[name]
        parts = [f"{key} {'|'.join(map(str, values))}" for key, values in arm.allowed.items()]
        seeding = _seeding({**{k: [v] for k, v in self.fixed.items()}, **arm.allowed})
        return f"{name}: {', '.join(parts)}" + (f" ({seeding})" if arm.inject == "init" else "")


def _seeding(allowed: dict[str, list[Any]]) -> str:
    """Which recurrent state the image seeds in an ``init`` arm (see study.models.inject.InitInject)."""
    cells = allowed.get("cell")
    seed_h = allowed.get("seed_h")
    lstm_only = cells is not None and "gru" not in cells
    if cells == ["gru"]:
        return "image into h0 of the first GRU layer, Tanti et al.'s init"
    if lstm_only and seed_h == [False]:
        return "image into c0 of the first LSTM layer only: the seed's model"
    if seed_h == [True]:
        return "image into h0 of the first layer, and c0 too for LSTM cells"
    return "image into the first layer's initial state"


def _check_arm(name: str, restriction: Any, fixed: dict[str, Any], space: dict[str, "Param"]) -> Arm:
    where = f"arms.{name}"
    if not isinstance(restriction, dict) or not restriction:
        raise ValueError(f"{where}: give the parameters this arm holds, e.g. {{inject: init, cell: [lstm]}}")
    allowed: dict[str, list[Any]] = {}
    for key, value in restriction.items():
        if key in fixed:
            raise ValueError(f"{where}: {key} is fixed to {fixed[key]!r} for every trial; an arm restricts "
                             f"searched parameters (searched: {sorted(space)})")
        if key not in space:
            raise ValueError(f"{where}: {key!r} is not a searched parameter, so the arm is outside the space "
                             f"(searched: {sorted(space)})")
        values = list(value) if isinstance(value, list) else [value]
        param = space[key]
        desc = param.describe()
        if not values:
            raise ValueError(f"{where}: {key} allows no value")
        if param.choice is None and len(values) > 1:
            raise ValueError(f"{where}: {key} is a {param.kind} range; an arm holds it at one value")
        for v in values:
            inside = v in desc["values"] if param.choice is not None else (
                isinstance(v, (int, float)) and not isinstance(v, bool) and desc["low"] <= v <= desc["high"])
            if not inside:
                span = desc["values"] if param.choice is not None else f"[{desc['low']}, {desc['high']}]"
                raise ValueError(f"{where}: {key} = {v!r} is outside the space (space.{key} {span})")
        allowed[key] = values
    injects = allowed.get("inject", [fixed["inject"]] if "inject" in fixed else None)
    if injects is None or len(injects) != 1:
        raise ValueError(f"{where}: hold inject at one value: an arm compares one way of giving the image")
    for key in allowed:  # a condition the arm cannot meet would leave the parameter unsampled in every trial
        for cond, values in (space[key].when or {}).items():
            values = values if isinstance(values, list) else [values]
            have = allowed.get(cond, [fixed[cond]] if cond in fixed else None)
            if have is None or any(v not in values for v in have):
                raise ValueError(f"{where}: {key} is sampled only where {cond} is in {values}; hold {cond} there "
                                 "too")
    return Arm(name, allowed, injects[0])


def _overlap(a: Arm, b: Arm, fixed: dict[str, Any], space: dict[str, "Param"]) -> dict[str, Any] | None:
    """A configuration lying in both arms, or None. Parameters only one arm restricts can take any value; a
    conditional one that only one arm restricts is in the other arm wherever it is sampled."""
    example: dict[str, Any] = {}
    for key in a.allowed.keys() | b.allowed.keys():
        if key in a.allowed and key in b.allowed:
            common = [v for v in a.allowed[key] if v in b.allowed[key]]
            if not common:
                return None
            example[key] = common[0]
        else:
            example[key] = (a.allowed.get(key) or b.allowed[key])[0]
    return dict(sorted(example.items()))
