"""Captioning models: cell stacks, injection methods, the one captioner and its decoders."""

from study.models.captioner import Captioner, build_captioner
from study.models.cells import CellStack, State, build_cell_stack
from study.models.inject import Injection, build_injection

__all__ = [
    "Captioner",
    "CellStack",
    "Injection",
    "State",
    "build_captioner",
    "build_cell_stack",
    "build_injection",
]
