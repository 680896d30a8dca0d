"""The injection methods and recurrent cells by name: the one list that everything else reads.

Config validation (which names are valid), the study driver (does any method need the 7x7 grid?), the models
(which class to build) and the analysis (each method's role in the verdict and its colour in the figures)
all read :data:`METHODS` and :data:`CELLS`. This module is a leaf: it imports neither torch nor the models,
so validating a spec or writing a report stays cheap. Classes are named by import path and imported only
when a model is built.

A new injection method is one ``Injection`` subclass plus one :func:`register_method` call; it is then a
valid ``inject`` value, a competitor (or whatever its role says) in the verdict, and has its colour in
every figure.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Role = Literal["target", "competitor", "floor"]
ROLES: tuple[Role, ...] = ("target", "competitor", "floor")


@dataclass(frozen=True)
class Method:
    """One injection method: where the image enters the decoder.

    ``role`` is its part in the verdict: the ``target`` (memory seeding, what the study asks about) is
    compared with the best ``competitor``; a ``floor`` (no image) shows how much the image adds.
    """

    name: str
    injection: str  # "module:Class" of its ``Injection`` subclass; imported by ``injection_class`` only
    role: Role
    needs_grid: bool  # True: it reads the spatial grid (G, F), so the grid features must be extracted too
    color: str  # "#rrggbb", the same in every figure
    reference: str = ""  # where the idea comes from

    def injection_class(self) -> type:
        return _import(self.injection)


METHODS: dict[str, Method] = {}  # insertion order is display order (verdict table, figure legends)

# Cell stacks by name -> "module:Class" (see study/models/cells.py).
CELLS: dict[str, str] = {
    "lstm": "study.models.cells:FusedLSTM",
    "gru": "study.models.cells:FusedGRU",
    "lstm_peephole": "study.models.cells:PeepholeLSTM",
}

# Image encoders by name: study.data.encoders registers their specs (and adds any new name here), and configs
# check a dataset's encoder against this set without importing torch.
ENCODERS: set[str] = {"efficientnet_lite0", "resnet50_torchvision"}

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")


def register_method(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS`. Checked here, without importing its class, so a typo fails at once."""
    if method.name in METHODS:
        raise ValueError(f"injection method {method.name!r} is already registered")
    if method.role not in ROLES:
        raise ValueError(f"method {method.name!r}: role {method.role!r}; allowed: {', '.join(ROLES)}")
    if not _IMPORT_PATH.match(method.injection):
        raise ValueError(f"method {method.name!r}: injection {method.injection!r} is not 'module:Class'")
    if not _COLOR.match(method.color):
        raise ValueError(f"method {method.name!r}: colour {method.color!r} is not '#rrggbb'")
    if method.role == "target" and any(m.role == "target" for m in METHODS.values()):
        raise ValueError(f"method {method.name!r}: the verdict has one target, and one is already registered")
    METHODS[method.name] = method
    return method


def cell_class(name: str) -> type:
    """The cell-stack class registered as ``name`` (the caller has checked that ``name`` is in CELLS)."""
    return _import(CELLS[name])


def any_needs_grid(names: Iterable[str | None]) -> bool:
    """Whether any of these methods reads the spatial grid (None and unknown names read nothing)."""
    return any(name in METHODS and METHODS[name].needs_grid for name in names)


def method_roles() -> dict[str, str]:
    """{method: role} for the verdict, in display order: what ``analysis`` is given (it never imports this)."""
    return {name: m.role for name, m in METHODS.items()}


def method_colors() -> dict[str, str]:
    """{method: "#rrggbb"} for the figures, in display order."""
    return {name: m.color for name, m in METHODS.items()}


def _import(path: str) -> type:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


_INJECT = "study.models.inject"
for _method in (
    Method("init", f"{_INJECT}:InitInject", "target", False, "#d62728", "the seed project (memory seeding)"),
    Method("pre", f"{_INJECT}:PreInject", "competitor", False, "#1f77b4", "Show and Tell (Vinyals et al. 2015)"),
    Method("par", f"{_INJECT}:ParInject", "competitor", False, "#2ca02c", "LRCN (Donahue et al. 2015)"),
    Method("merge", f"{_INJECT}:MergeInject", "competitor", False, "#9467bd", "m-RNN / Tanti et al. 2018"),
    Method("attention", f"{_INJECT}:AttentionInject", "competitor", True, "#ff7f0e",
           "Show, Attend and Tell (Xu et al. 2015)"),
    Method("none", f"{_INJECT}:Injection", "floor", False, "#7f7f7f", "no image: the language-model floor"),
):
    register_method(_method)
del _method
