"""One driver per study: a lock file in the study folder, held for the driver's life.

Two drivers on one study mix it (trials twice, two MLflow parent runs, a leaderboard ranking a killed copy),
so ``study run``, ``study resume`` and ``study report`` take ``<study folder>/driver.lock`` first. The lock
names its holder (PID, host, start time, command). A second driver refuses while the holder lives. A lock
left behind by a driver that died (same host, PID gone or reused) is stale: it is reported and taken over, and
the processes of the dead driver's job (its Ray: GCS, raylet, agents, workers, which outlive a ``kill -9`` of
the driver by about a minute) are ended when the driver led its own process group.

Limits: the lock is a local file, so it guards drivers that share the study folder's filesystem; with
``s3://`` storage the bookkeeping folder is the driver machine's ``./runs/<name>``, so two machines are not
kept apart. A lock held on another host cannot be checked from here and is always refused.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study.records.paths import StudyPaths

LOCK_FILE = StudyPaths.at(Path(".")).lock.name  # "driver.lock"
FRESH_SECONDS = 10.0  # an empty lock younger than this is being written by a starting driver


class StudyInUse(RuntimeError):
    """Another driver that is alive (or cannot be checked) holds the study's lock."""


@dataclass
class StudyLock:
    """A held lock; use it as a context manager to release it when the driver ends."""

    path: Path
    holder: dict[str, Any]
    took_over: str | None = None  # what was reported when a stale lock was taken over
    ended: list[int] = field(default_factory=list)  # PIDs of the dead driver's job that were ended

    def __enter__(self) -> "StudyLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if _read(self.path) == self.holder:  # never remove a lock some other driver has taken since
            self.path.unlink(missing_ok=True)


def acquire(folder: Path, command: str) -> StudyLock:
    """Take ``folder/driver.lock`` for this process, or raise ``StudyInUse`` naming the holder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "process_start": _process_start(os.getpid()), "group_leader": os.getpgrp() == os.getpid(),
          "command": command}
    took_over, ended = None, []
    for _ in range(2):  # at most once more, after moving a stale lock away
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder is None:
                if time.time() - _mtime(path) < FRESH_SECONDS:
                    raise StudyInUse(f"study folder {folder} is being locked by another driver right now "
                                     f"({path})") from None
                holder = {}  # empty or unreadable and old: a driver died while writing it
            elif holder.get("host") != me["host"]:
                raise StudyInUse(f"{_describe(holder)} holds study folder {folder} ({path}). It runs on another "
                                 f"host, so it cannot be checked from here: wait for it to end, or, if it is gone, "
                                 f"delete {path}") from None
            elif _alive(holder):
                raise StudyInUse(f"{_describe(holder)} is using study folder {folder}; one driver per study. "
                                 f"Wait for it to end (or stop it), then run this again. Lock: {path}") from None
            _move_away(path, holder)
            ended = _end_job(holder)
            took_over = (f"took over a stale lock: {_describe(holder)} is no longer running"
                         + (f"; ended {len(ended)} processes its Ray left behind" if ended else ""))
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        return StudyLock(path, me, took_over, ended)
    raise StudyInUse(f"another driver took over the stale lock {path} at the same time")


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a driver (its lock is empty)"
    return (f"`{holder.get('command', 'a driver')}` (PID {holder.get('pid')} on {holder.get('host')}, "
            f"started {holder.get('started')})")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _move_away(path: Path, holder: dict[str, Any]) -> None:
    """Remove a stale lock, unless another driver replaced it first (then it is put back and we refuse)."""
    moved = path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return  # another driver removed it; the next O_EXCL create decides who holds the lock
    if (_read(moved) or {}) != holder:
        os.rename(moved, path)
        raise StudyInUse(f"another driver took over the stale lock {path} at the same time")
    moved.unlink()


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...), or None off Linux / if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _process_start(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields else None  # starttime, in clock ticks since boot


def _alive(holder: dict[str, Any]) -> bool:
    pid = int(holder.get("pid", 0))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    fields = _stat(pid)
    if fields is None:
        return True  # no /proc: trust the signal check
    if fields[0] == "Z":
        return False  # killed, not yet reaped by its parent
    recorded = holder.get("process_start")
    return recorded is None or fields[19] == recorded  # a different start time: the PID was reused


def _end_job(holder: dict[str, Any]) -> list[int]:
    """SIGKILL what is left of a dead driver's job: the processes of the process group it led (its local
    Ray's GCS, raylet, agents and workers inherit it). Only when it led its group, and only processes proven to
    be that job's: started no earlier than the driver, and running Ray's own executables or this platform's command.
    A PID (and so a group id) reused by an unrelated process, even a session leader, is never signalled."""
    if not holder.get("group_leader") or holder.get("host") != socket.gethostname():
        return []
    group = int(holder["pid"])
    driver_start = holder.get("process_start")
    ended = []
    for proc in Path("/proc").glob("[0-9]*"):
        pid = int(proc.name)
        fields = _stat(pid)
        if not fields or int(fields[2]) != group or pid == os.getpid() or not _of_the_job(pid, fields, driver_start):
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            ended.append(pid)
        except OSError:
            pass  # gone meanwhile, or not ours
    return ended


def _of_the_job(pid: int, fields: list[str], driver_start: str | None) -> bool:
    """Whether a process of the dead driver's group is one that driver's job started."""
    if driver_start is None or int(fields[19]) < int(driver_start):
        return False  # older than the driver (or the lock cannot say): not its child
    if pid == int(fields[2]) and fields[19] != driver_start:
        return False  # the group's leader is a new process that reused the driver's PID
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return _runs_ray(argv) or _runs_study(argv)


def _runs_ray(argv: list[str]) -> bool:
    """Ray's own processes: a worker's title (``ray::IDLE``, ``ray::ImplicitFunc.train``), or an executable or
    script inside the installed ``ray`` package (raylet, gcs_server, default_worker.py, the dashboard and its
    agents). A word such as ``--job=array-42`` anywhere in a command line proves nothing (issue 33, item 3)."""
    if argv[0].startswith("ray::"):
        return True
    package = _ray_package()
    return package is not None and any(_inside(word, package) for word in argv[:2])


def _runs_study(argv: list[str]) -> bool:
    """This platform's own command: ``study ...`` or ``python -m study ...`` (not a word that contains "study")."""
    if Path(argv[0]).name == "study":
        return True
    return Path(argv[0]).name.startswith("python") and argv[1:3] == ["-m", "study"]


def _inside(word: str, folder: Path) -> bool:
    if not word.startswith("/"):
        return False
    try:
        return Path(word).resolve().is_relative_to(folder)
    except OSError:
        return False


def _ray_package() -> Path | None:
    """The installed ``ray`` package's folder, found without importing Ray."""
    import importlib.util

    spec = importlib.util.find_spec("ray")
    return Path(spec.origin).resolve().parent if spec and spec.origin else None
