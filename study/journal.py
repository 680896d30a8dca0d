"""The study's tracking journal: every tracking event, appended to a local file before MLflow sees it.

``tracking_journal.jsonl`` holds one JSON event per line, in order, and is only ever appended to;
``tracking_sent.json`` records how far MLflow has got (events sent and the byte offset of the first unsent one).
So a dead tracking server, a killed driver or a study copied to another machine loses nothing: whatever was
not sent is sent later (``study sync``), and every reader of a study's history (the tracker after a resume,
the provenance) reads it from here. No MLflow in this module: ``study.tracking`` does the sending.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from study.files import atomic_write_json


class Journal:
    """Append-only event file plus the sent marker; ``pending`` events are those MLflow has not seen."""

    def __init__(self, path: Path, sent_file: Path):
        self.path, self.sent_file = Path(path), Path(sent_file)
        sent = json.loads(self.sent_file.read_text()) if self.sent_file.exists() else {}
        self.sent: int = sent.get("sent", 0)
        self.sent_offset: int = sent.get("offset", 0)  # byte offset of the first unsent event
        self.written = len(self.path.read_bytes().splitlines()) if self.path.exists() else 0

    @property
    def pending(self) -> int:
        return self.written - self.sent

    def append(self, event: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(event) + "\n")
        self.written += 1

    def events(self, kind: str) -> Iterator[dict[str, Any]]:
        """Every journalled event of one ``kind``, oldest first (lines of other kinds are not parsed)."""
        if not self.path.exists():
            return
        marker = f'"{kind}"'.encode()
        with self.path.open("rb") as fh:
            for line in fh:
                if marker in line:
                    event = json.loads(line)
                    if event.get("kind") == kind:
                        yield event

    def unsent(self) -> list[bytes]:
        """The raw lines not sent yet (read from the sent offset on, not the whole file)."""
        with self.path.open("rb") as fh:
            fh.seek(self.sent_offset)
            return fh.readlines()

    def mark_sent(self, line: bytes) -> None:
        """Record one more line as sent, durably (a driver killed right after resends nothing)."""
        self.sent += 1
        self.sent_offset += len(line)
        atomic_write_json(self.sent_file, {"sent": self.sent, "offset": self.sent_offset})
