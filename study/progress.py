"""Progress for the study's long steps (search trials, confirm runs, evaluated runs): a redrawn tqdm bar at a
terminal, one plain line per step elsewhere.

A bar redrawn with ``\\r`` is unreadable in a log file, under CI or ``nohup``, and tqdm draws none at all
without a terminal width; there each finished step prints one line instead, with the count, the elapsed time
and an ETA, e.g. ``confirm runs: 3/12 done (init-r1-s0), 1 min 10 s elapsed, about 4 min left``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

_clock = time.monotonic  # the tests set their own


def interactive() -> bool:
    """Bars only when a person watches both streams: stdout and stderr (where bars draw) are terminals."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def duration(seconds: float) -> str:
    """A short, readable duration: ``45 s``, ``3 min 05 s``, ``2 h 10 min``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest:02d} s"
    hours, rest = divmod(round(seconds / 60), 60)
    return f"{hours} h {rest:02d} min"


class LineProgress:
    """tqdm's interface as far as the study uses it (``update``, ``set_postfix_str``, ``write``, ``close``, ``n``,
    ``total``, ``disable``), printing one plain line per update instead of redrawing a bar."""

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0, disable: bool = False,
                 file: TextIO | None = None, min_interval_s: float = 0.0):
        self.total, self.desc, self.unit, self.n, self.disable = total, desc, unit, initial, disable
        self.file = file
        self.min_interval_s = min_interval_s
        self.postfix = ""
        self._start = _clock()
        self._start_n = initial
        self._printed_at = -float("inf")

    @property
    def stream(self) -> TextIO:
        return self.file or sys.stderr  # looked up when printing: pytest and typer swap sys.stderr

    def line(self, now: float) -> str:
        elapsed = now - self._start
        text = f"{self.desc}: {self.n}/{self.total} {self.unit}s done"
        if self.postfix:
            text += f" ({self.postfix})"
        text += f", {duration(elapsed)} elapsed"
        done = self.n - self._start_n
        if 0 < done and self.n < self.total:
            text += f", about {duration(elapsed / done * (self.total - self.n))} left"
        return text

    def update(self, n: int = 1) -> None:
        self.n += n
        now = _clock()
        if self.disable or (now - self._printed_at < self.min_interval_s and self.n < self.total):
            return
        self._printed_at = now
        print(self.line(now), file=self.stream, flush=True)

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def write(self, line: str, file: TextIO | None = None) -> None:
        print(line, file=file or self.stream, flush=True)

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, *, unit: str = "it", enabled: bool = True, initial: int = 0,
                 min_interval_s: float = 0.0, **tqdm_args: Any):
    """A tqdm bar at a terminal; a ``LineProgress`` (one line per update, at most one per ``min_interval_s``
    but always the last) when not; disabled (silent) when not ``enabled``."""
    if enabled and not interactive():
        return LineProgress(total, desc, unit=unit, initial=initial, min_interval_s=min_interval_s)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=not enabled, **tqdm_args)
