"""The study a command names: found (by name or folder) and locked for this driver, or a clear failure.

Shared by the commands in ``study.cli.app`` and ``study.cli.evaluate_command``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from study.config import ConfigError
from study.console import console, fail
from study.records.files import is_disk_full


def open_study(study: str, storage: Optional[Path], *, started: bool = True):
    """The study named on the command line (a name under --storage or ./runs, or a folder), with the spec,
    storage and MLflow store it ran with; ``started``: fail unless its search has begun."""
    from study.records.paths import StudyRecordError
    from study.study import Study, StudyNotFound

    try:
        found = Study.open(study, storage)
    except (StudyNotFound, StudyRecordError, ConfigError) as exc:
        fail(str(exc))
    if started and not found.search_started():
        # A study that stopped before its search began (e.g. a bad image in data preparation) has a study.json but
        # no Tune state and no trials: say so and how to go on, rather than fail on its missing MLflow experiment.
        fail(f"study {found.name!r} has no trials yet: its search has not started (no Tune state in "
              f"{found.paths.root}). Either it is still preparing its data, or it stopped there (e.g. at a bad "
              f"image): fix what its `study run` reported, then continue it with: study resume {found.paths.root}")
    return found


def lock_study(study, command: str):
    """Take the study's driver lock (one driver per study, see study/records/lock.py) or fail naming its holder."""
    from study.records.lock import StudyInUse

    try:
        lock = study.lock(command)
    except StudyInUse as exc:
        fail(str(exc))
    except OSError as exc:  # a read-only mount: one sentence, not Errno 30's traceback (issue 33, item 10)
        fail(f"cannot write the study's lock {study.paths.lock}: {exc.strerror or exc}; `{command.split()[1]}` "
             "writes into the study folder, so it needs the folder writable")
    if lock.took_over:
        console.print(f"[yellow]{lock.took_over}[/]", highlight=False)
    return lock


def fail_on_full_disk(exc: OSError, study, then: str) -> None:
    """A full disk (ENOSPC, from any write of the study: the journal, Tune's state, a checkpoint) stops the command
    in one sentence naming the filesystem and what to run once space is freed; any other OS error is re-raised.
    Every file something later reads is written whole (write-then-rename) or appended line by line, so what was
    finished survives: ``then`` (``study resume ...``) continues from it."""
    if not is_disk_full(exc):
        raise exc
    folder = Path(study.paths.root).resolve()
    mount = folder
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        free = f", {shutil.disk_usage(folder).free / 2**20:.1f} MiB free now"
    except OSError:
        free = ""
    fail(f"no space left on the filesystem at {mount} (it holds {folder}{free}): the study stopped there and "
         f"nothing it had finished is lost; free some space, then continue with: {then}")
