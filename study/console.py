"""What every ``study`` command prints with, and how it fails: one sentence naming what and where, exit code 2."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

# Help texts are docstrings wrapped at 120 columns: markdown mode joins their lines into paragraphs, where the
# default ("rich") kept each line break and broke sentences in the middle at 80 and 120 columns.
HELP_MARKUP = "markdown"

# soft_wrap: never break an error message or a table row in the middle of a key name.
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def wrapped(text: str, width: int | None = None) -> str:
    """``text`` wrapped to the terminal's width, at most 100 columns (100 without a terminal: a log file, CI),
    each line on its own; words are never split, so a path, a number or ``init - par`` stays whole."""
    import shutil
    import textwrap

    width = width or min(100, shutil.get_terminal_size((100, 24)).columns)
    return "\n".join(textwrap.fill(line, width, break_long_words=False, break_on_hyphens=False) if line else line
                     for line in text.splitlines())


def fail(message: str) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


def writable_folder(folder: Path) -> None:
    """Create ``folder`` and write a scratch file in it: a read-only or impossible path fails now, with its
    name, rather than with a traceback when the first result is saved."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        fail(f"cannot write to {folder}: {exc.strerror or exc}")
