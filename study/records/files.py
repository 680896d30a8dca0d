"""Write-then-rename: a reader (another process, a resumed driver, a user's editor) sees the old file or the
new one, never half of one. Every file the project writes that something later reads goes through here."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file beside it (same filesystem, so the rename is atomic).
    The temporary name carries the PID: two processes writing the same file never share one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value: Any, *, indent: int | None = None, **dumps_options: Any) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=indent, **dumps_options))


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or what it wraps (a trial's ``RayTaskError``, pyarrow's copy error, a chained cause), is a
    full disk: ``ENOSPC``, which pyarrow and Ray's wrappers sometimes keep only in the message."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return False


def repository_root(path: Path) -> Path | None:
    """The nearest folder at or above ``path`` that holds ``.git`` (a clone, or a worktree's ``.git`` file), or
    None outside any repository."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if (folder / ".git").exists():
            return folder
    return None
