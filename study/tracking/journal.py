"""The study's tracking journal: every tracking event, appended to a local file before MLflow sees it.

``tracking_journal.jsonl`` holds one JSON event per line, in order, and is only ever appended to;
``tracking_sent.json`` records how far MLflow has got (events sent and the byte offset of the first unsent one).
So a dead tracking server, a killed driver or a study copied to another machine loses nothing: whatever was
not sent is sent later (``study sync``), and every reader of a study's history (the tracker after a resume,
the provenance) reads it from here. No MLflow in this module: ``study.tracking`` does the sending.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from study.records.files import atomic_write_json


def _read_sent(path: Path) -> dict[str, Any]:
    """The sent marker; a damaged one (edited, or written by hand) counts as nothing sent, said once: every event
    is sent again, and MLflow finds the study's runs again by their tags (issue 33, item 16)."""
    if not path.exists():
        return {}
    try:
        sent = json.loads(path.read_text())
        if isinstance(sent, dict) and isinstance(sent.get("sent", 0), int) and isinstance(sent.get("offset", 0), int):
            return sent
    except (ValueError, OSError):
        pass
    logging.getLogger(__name__).warning(
        "%s is damaged (not the record of how far MLflow got): every journalled event is sent again (values MLflow "
        "already had may appear twice in its metric histories; delete its store to rebuild it exactly)", path)
    return {}


class Journal:
    """Append-only event file plus the sent marker; ``pending`` events are those MLflow has not seen."""

    def __init__(self, path: Path, sent_file: Path):
        self.path, self.sent_file = Path(path), Path(sent_file)
        sent = _read_sent(self.sent_file)
        self.sent: int = sent.get("sent", 0)
        self.sent_offset: int = sent.get("offset", 0)  # byte offset of the first unsent event
        self.written = len(self.path.read_bytes().splitlines()) if self.path.exists() else 0

    @property
    def pending(self) -> int:
        return self.written - self.sent

    def append(self, event: dict[str, Any]) -> None:
        with self.path.open("ab") as fh:
            if fh.tell() and not _ends_with_newline(self.path):
                # A kill or a full disk tore the last line: end it, so this event is a line of its own (the torn
                # one is then a bad line, skipped by name) rather than glued onto it.
                fh.write(b"\n")  # (the torn line was counted in ``written`` already)
            fh.write((json.dumps(event) + "\n").encode())
        self.written += 1

    def events(self, kind: str) -> Iterator[dict[str, Any]]:
        """Every journalled event of one ``kind``, oldest first (lines of other kinds are not parsed; a torn or
        garbled line is passed over: ``unsent`` names it)."""
        if not self.path.exists():
            return
        marker = f'"{kind}"'.encode()
        with self.path.open("rb") as fh:
            for line in fh:
                if marker in line:
                    event = parse_event(line)
                    if event is not None and event.get("kind") == kind:
                        yield event

    def unsent(self) -> list[tuple[int, bytes, dict[str, Any] | None]]:
        """(line number, raw line, event) of each complete line not sent yet, read from the sent offset on; the
        event is None for a line that is not a journal event (garbled JSON, or no ``kind``). An incomplete last
        line (no newline: a write in progress, or torn by a kill) is left for later."""
        with self.path.open("rb") as fh:
            fh.seek(self.sent_offset)
            lines = fh.readlines()
        if lines and not lines[-1].endswith(b"\n"):
            lines.pop()
        return [(self.sent + 1 + i, line, parse_event(line)) for i, line in enumerate(lines)]

    def rewind(self) -> None:
        """Mark nothing as sent: the whole journal goes to MLflow again (a store that lost the study's runs)."""
        self.sent, self.sent_offset = 0, 0
        atomic_write_json(self.sent_file, {"sent": 0, "offset": 0})

    def torn_tail(self) -> bool:
        """Whether the last line is incomplete (no newline): torn by a kill or a full disk, or being written."""
        return self.path.exists() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)

    def mark_sent(self, line: bytes) -> None:
        """Record one more line as sent, durably (a driver killed right after resends nothing)."""
        self.sent += 1
        self.sent_offset += len(line)
        atomic_write_json(self.sent_file, {"sent": self.sent, "offset": self.sent_offset})


def parse_event(line: bytes) -> dict[str, Any] | None:
    """A journal line's event, or None when the line is not one (torn, garbled, or without a ``kind``)."""
    try:
        event = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return event if isinstance(event, dict) and isinstance(event.get("kind"), str) else None


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as fh:
        fh.seek(-1, 2)
        return fh.read(1) == b"\n"


def read_runs_file(path: Path) -> dict[str, str]:
    """``mlflow_runs.json``; a damaged one is only a lost shortcut: each run is found again by its tags."""
    if not path.exists():
        return {}
    try:
        runs = json.loads(path.read_text())
        if isinstance(runs, dict) and all(isinstance(v, str) for v in runs.values()):
            return runs
    except (ValueError, OSError):
        pass
    logging.getLogger(__name__).warning("%s is damaged: the study's MLflow runs are found again by their tags", path)
    return {}
