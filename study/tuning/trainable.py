"""The Tune trainable, and the rules that let a killed study resume without training any epoch twice.

A trial runs the shared training loop (``study.trial.training.run_trial``) and reports each epoch with a checkpoint
that carries the trial's epochs so far (``history.json``). On a retry or a resume, the trial's own folder, not
Tune's possibly older snapshot, decides where it continues (``restore_source``). A trial that diverged leaves
``diverged.txt`` so its retries end at once. Finished trials keep only their newest checkpoint
(``prune_checkpoints``); trials Tune lost with a snapshot are removed (``remove_lost_trial_folders``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from ray import tune

from study.data.prepare import PreparedData
from study.records.files import atomic_write_json
from study.records.trial_tables import (
    DIVERGED_NOTE,
    HISTORY_FILE,
    PRUNED_NOTE,
    checkpoint_folders,
    experiment_path,
    experiment_trials,
    trial_checkpoints,
)
from study.spec import StudySpec

log = logging.getLogger(__name__)



def trial_function(config: dict[str, Any], spec: StudySpec, data: PreparedData) -> None:
    """The Tune trainable: sampled config -> the shared training loop, reporting each epoch."""
    import pyarrow.fs as pafs
    import torch

    from study.trial.training import TrialDiverged, run_trial

    torch.set_num_threads(max(1, int(spec.resources.cpu)))  # follow the trial's CPU share
    cfg = spec.trial_config(config)
    # A diverged trial would only diverge again (resume is exact), but Tune retries every error max_failures
    # times and prints each one's traceback. So divergence is not an error for Tune: the trial leaves a note in
    # its storage folder and ends; the study's tables, MLflow and the console read the note and call it errored.
    storage = tune.get_context().get_storage()
    diverged_note = f"{storage.trial_fs_path}/{DIVERGED_NOTE}"
    fs = storage.storage_filesystem
    if fs.get_file_info(diverged_note).type == pafs.FileType.File:
        return  # diverged before (a resumed study): nothing to train
    checkpoint = restore_source(tune.get_checkpoint(), fs, storage.trial_fs_path)
    with tempfile.TemporaryDirectory(prefix="trial-") as tmp:
        resume_from, history = None, []
        if checkpoint is not None:
            resume_from = Path(checkpoint.to_directory(os.path.join(tmp, "restored")))
            if (resume_from / HISTORY_FILE).is_file():
                history = json.loads((resume_from / HISTORY_FILE).read_text())
        if history:
            # Tell Tune the restored checkpoint's last epoch first: its result may never have reached the killed
            # driver (the tracker drops it if it did). A trial that had finished ends here without training.
            tune.report(history[-1], checkpoint=tune.Checkpoint.from_directory(str(resume_from)))
            if history[-1]["epoch"] >= cfg.epochs:
                return

        def report(metrics: dict[str, Any], checkpoint_dir: Path) -> None:
            # Every checkpoint carries the trial's epochs so far as plain JSON: which checkpoint is newest,
            # and the study's tables (load_trial_tables), are read from it without loading a model.
            history.append(metrics)
            atomic_write_json(checkpoint_dir / HISTORY_FILE, history)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

        try:
            run_trial(cfg, data, work_dir=Path(tmp), on_epoch=report, resume_from=resume_from, progress=False)
        except TrialDiverged as diverged:
            fs.create_dir(storage.trial_fs_path, recursive=True)
            with fs.open_output_stream(diverged_note) as note:
                note.write(str(diverged).encode())
            log.warning("%s", diverged)  # one line; the driver reports the trial as errored


def restore_source(checkpoint, fs, trial_fs_path: str):
    """The checkpoint a retried or resumed trial continues from: the newest complete one in its folder.

    Tune's experiment snapshot can lag behind the trial: after a driver is killed it may name an older
    checkpoint, a pruned one, or none at all although the trial trained (and even finished) several epochs.
    Continuing from any of those would train epochs again, so the trial's own folder decides (Tune's
    checkpoint only when the folder has none)."""
    import pyarrow.fs as pafs

    from study.trial.checkpoints import CHECKPOINT_FILE

    found = trial_checkpoints(fs, trial_fs_path)
    if found:
        epoch, newest = found[-1]
        if checkpoint is None or checkpoint.path != newest:
            log.warning("continuing from %s (epoch %d), not Tune's %s", newest, epoch,
                        checkpoint.path if checkpoint is not None else "fresh start")
        return tune.Checkpoint(newest, filesystem=fs)
    if checkpoint is None or checkpoint.filesystem.get_file_info(
            f"{checkpoint.path}/{CHECKPOINT_FILE}").type == pafs.FileType.NotFound:
        return None  # gone or pruned, and nothing else left
    return checkpoint  # written before checkpoints carried history.json


def remove_lost_trial_folders(spec: StudySpec, known: set[str]) -> None:
    """Delete the folders (and checkpoints) of trials Tune lost with its last snapshot before a crash;
    they are never resumed (the searcher proposes them again under new ids)."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(experiment_path(spec))
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type != pafs.FileType.Directory or info.base_name.rsplit("-", 1)[-1] in known:
            continue  # folder names end in the trial id: see trial_name
        # A trial's folder: Tune's params.json, or only checkpoints (the trial writes those itself, and a
        # driver killed early may not have synced params.json yet).
        if checkpoint_folders(fs, info.path) \
                or fs.get_file_info(f"{info.path}/params.json").type == pafs.FileType.File:
            fs.delete_dir(info.path)


def prune_checkpoints(trial) -> None:
    """Free the space of all but the newest checkpoint of a finished trial (local folder or s3://, via Tune's
    fs): the one with the most epochs and, of equals, the one Tune registered last.

    The older folders are emptied, not removed, until the study ends (``drop_pruned_checkpoints``): a driver
    killed before Tune's next snapshot leaves one that names an older checkpoint of this trial, and Tune
    refuses to restore a trial whose named checkpoint folder is gone. From an emptied one the trial goes on
    from its newest complete checkpoint (``restore_source``), so it does not train again."""
    import pyarrow.fs as pafs

    fs = trial.storage.storage_filesystem
    registered = trial.checkpoint.path if trial.checkpoint is not None else None
    found = trial_checkpoints(fs, trial.storage.trial_fs_path)
    if not found:
        return
    keep = max(found, key=lambda item: (item[0], item[1] == registered, item[1]))[1]
    # After a restore Tune numbers checkpoints on from its own, older count, so it can write one into a folder
    # pruned before: the note left there must go, or the study's end would drop the trial's one checkpoint.
    if fs.get_file_info(f"{keep}/{PRUNED_NOTE}").type == pafs.FileType.File:
        fs.delete_file(f"{keep}/{PRUNED_NOTE}")
    for path in checkpoint_folders(fs, trial.storage.trial_fs_path):
        if path != keep and fs.get_file_info(f"{path}/{PRUNED_NOTE}").type == pafs.FileType.NotFound:
            fs.delete_dir_contents(path)
            with fs.open_output_stream(f"{path}/{PRUNED_NOTE}") as note:  # keeps the folder on s3:// too
                note.write(f"pruned: {keep} is this trial's checkpoint\n".encode())


def drop_pruned_checkpoints(spec: StudySpec) -> None:
    """Remove the emptied checkpoint folders of every trial the study's final snapshot shows finished: no
    snapshot can name them any more."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(experiment_path(spec))
    for trial in experiment_trials(spec):
        if trial["status"] in ("TERMINATED", "ERROR"):
            drop_pruned(fs, f"{root}/{trial['relative_logdir']}")


def drop_pruned(fs, trial_fs_path: str) -> None:
    """Remove a trial folder's pruned checkpoint folders; one that holds a complete checkpoint stays, whatever
    note it carries (Tune may have written a checkpoint into a folder pruned before, see prune_checkpoints)."""
    import pyarrow.fs as pafs

    complete = {path for _, path in trial_checkpoints(fs, trial_fs_path)}
    for path in checkpoint_folders(fs, trial_fs_path):
        if path not in complete and fs.get_file_info(f"{path}/{PRUNED_NOTE}").type == pafs.FileType.File:
            fs.delete_dir(path)
