"""Config errors a person can act on: ``file:line: key.path: what is wrong``, the nearest valid name for a
misspelt key, and no pydantic prefixes ("Value error, ", "<top level>").

``study.config.validate_model`` formats every ``ValidationError`` here; the line of a key comes from the YAML
file's node tree (``yaml.compose``), so it is found without a loader of our own.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError


def did_you_mean(name: str, allowed: Iterable[str]) -> str:
    """`` (did you mean `dropout`?)`` for the closest of ``allowed`` to a misspelt ``name``, else ``""``."""
    close = difflib.get_close_matches(str(name), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def key_lines(path: Path) -> dict[tuple[str, ...], int]:
    """Each key path of a YAML file (``("space", "lr")``) and the 1-based line where its key is written; empty
    when the file cannot be read or parsed (the error is then reported without a line)."""
    try:
        root = yaml.compose(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                here = (*prefix, str(key.value))
                lines.setdefault(here, key.start_mark.line + 1)
                walk(value, here)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                here = (*prefix, str(i))
                lines.setdefault(here, item.start_mark.line + 1)
                walk(item, here)

    walk(root, ())
    return lines


def _field_names(model: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items()]


def _models_in(annotation: Any) -> list[Any]:
    """The types an annotation may hold: the members of a union (``X | None``, ``Annotated[Union[...]]``)."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _models_in(arg)]
    return [annotation]


def allowed_keys(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed beside the last part of ``loc`` (an unknown key's location) in ``model``; [] when the
    location cannot be followed (a plain dict, a list)."""
    current: list[Any] = [model] if model is not None else []
    for part in loc[:-1]:
        following: list[Any] = []
        for kind in current:
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                fields = {f.alias or n: f for n, f in kind.model_fields.items()} | dict(kind.model_fields)
                if part in fields:
                    following += _models_in(fields[part].annotation)
                elif "kind" in fields and fields["kind"].default == part:
                    following.append(kind)  # a discriminated union's tag: loc dataset.shapes.imgs
            elif typing.get_origin(kind) is dict:
                following += _models_in(typing.get_args(kind)[1])
        current = following
    names = [name for kind in current if isinstance(kind, type) and issubclass(kind, BaseModel)
             for name in _field_names(kind)]
    return sorted(set(names))


_KEY_PATH = re.compile(r"^([A-Za-z_][\w-]*(?:\.[\w-]+|\[\d+\])*): ")


def format_validation_error(err: ValidationError, source: str, model: type[BaseModel] | None = None) -> str:
    """One line per problem: ``file:line: key.path: what is wrong``, with the nearest valid name for an unknown
    key; a validator's message that starts with a key path (``space.dropuot: ...``) gets that key's line."""
    lines_of = key_lines(Path(source)) if source and Path(source).is_file() else {}
    problems = []
    for problem in err.errors():
        loc = tuple(problem["loc"])
        msg = problem["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if problem["type"] == "extra_forbidden":
            allowed = allowed_keys(model, loc)
            msg = "unknown key" + (did_you_mean(str(loc[-1]), allowed) + f"; allowed: {', '.join(allowed)}"
                                   if allowed else " (check the spelling)")
        elif problem["type"] == "literal_error" and "expected" in problem.get("ctx", {}):
            msg = f"got {problem.get('input')!r}; allowed: {problem['ctx']['expected']}"
        key = ".".join(str(part) for part in loc)
        named = _KEY_PATH.match(msg) if not key else None
        path = tuple(re.split(r"\.|\[", named.group(1).replace("]", ""))) if named else tuple(map(str, loc))
        line = _line_of(lines_of, path)
        where = f"{source}:{line}" if line else source
        problems.append(f"{where}: {key}: {msg}" if key else f"{where}: {msg}")
    if len(problems) == 1:
        return problems[0]
    return f"{source}: {len(problems)} problems\n" + "\n".join(f"  {p}" for p in problems)


def _line_of(lines_of: dict[tuple[str, ...], int], path: tuple[str, ...]) -> int | None:
    """The line of ``path``'s key, or of its nearest parent written in the file (a discriminated union's tag,
    ``dataset.shapes.imgs``, is not a key of the file: it is skipped)."""
    parts = [p for p in path if p not in ("shapes", "karpathy")] if path[:1] == ("dataset",) else list(path)
    while parts:
        if tuple(parts) in lines_of:
            return lines_of[tuple(parts)]
        parts.pop()
    return None
