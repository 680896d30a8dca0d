"""A resumed search's trial folders, built by hand as Tune and the trainable leave them (no Ray, no training):
the folders of trials lost with the last snapshot are deleted and nothing else; a resumed trial continues from
its newest complete checkpoint whatever the snapshot named; a checkpoint Tune wrote into a pruned folder
survives the pruning and the study's end."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import study_spec


def test_resume_deletes_the_folders_of_trials_lost_with_the_last_snapshot_and_nothing_else(tmp_path):
    """Seen in clean-clone CI runs: a lost trial's folder can hold Tune's params.json, or (driver killed
    earlier) only the checkpoints the trial wrote itself. Both go; known trials and other folders stay."""
    from study.records.trial_tables import experiment_path
    from study.spec import load_spec
    from study.tuning.trainable import remove_lost_trial_folders

    spec = load_spec(study_spec(tmp_path, "lost", {"kind": "shapes", "images": 60}, methods=["init"]))
    tune_dir = Path(experiment_path(spec))
    folders = {
        "init-lstm-1x48-word-aaaa0001": ["params.json", "checkpoint_000000/model.pt"],  # known: kept
        "init-lstm-1x48-word-bbbb0002": ["params.json", "checkpoint_000000/model.pt"],  # lost, synced
        "init-lstm-1x48-word-cccc0003": ["checkpoint_000000/model.pt", "checkpoint_000001/model.pt"],  # lost
        "notes": ["readme.txt"],  # not a trial's folder
    }
    for name, files in folders.items():
        for file in files:
            (tune_dir / name / file).parent.mkdir(parents=True, exist_ok=True)
            (tune_dir / name / file).write_text("x")
    remove_lost_trial_folders(spec, known={"aaaa0001"})
    assert sorted(p.name for p in tune_dir.iterdir()) == ["init-lstm-1x48-word-aaaa0001", "notes"]


def _checkpoint(folder: Path, epochs: int, complete: bool = True) -> None:
    """A trial checkpoint folder as the trainable writes it: checkpoint.pt (a zip archive, as torch.save
    writes) and history.json with the epochs so far."""
    import zipfile

    folder.mkdir(parents=True)
    (folder / "history.json").write_text(json.dumps([{"epoch": e} for e in range(1, epochs + 1)]))
    with zipfile.ZipFile(folder / "checkpoint.pt", "w") as archive:
        archive.writestr("data.pkl", b"x" * 100)
    if not complete:  # cut short by a kill while Tune copied it
        data = (folder / "checkpoint.pt").read_bytes()
        (folder / "checkpoint.pt").write_bytes(data[: len(data) // 2])


def test_a_resumed_trial_continues_from_its_newest_complete_checkpoint_whatever_the_snapshot_named(tmp_path):
    """Tune's snapshot can lag behind a trial killed with its driver: it may name an older checkpoint, a
    pruned one, or none. The trial continues from the newest complete checkpoint in its folder, by the epochs
    it holds (Tune numbers checkpoints on from its own count after such a restore), never a cut-short one."""
    import pyarrow.fs as pafs
    from ray import tune

    from study.tuning.trainable import restore_source

    fs = pafs.LocalFileSystem()
    trial = tmp_path / "init-lstm-1x48-word-aaaa0001"
    _checkpoint(trial / "checkpoint_000001", 2)
    _checkpoint(trial / "checkpoint_000002", 4)  # numbered by Tune after a restore from epoch 3's
    _checkpoint(trial / "checkpoint_000003", 3)
    _checkpoint(trial / "checkpoint_000004", 5, complete=False)
    (trial / "checkpoint_000000").mkdir()  # pruned after the trial finished: emptied, kept while a snapshot names it
    (trial / "checkpoint_000000" / "pruned.txt").write_text("pruned")
    newest = str(trial / "checkpoint_000002")
    for named in (None, tune.Checkpoint(str(trial / "checkpoint_000001")),
                  tune.Checkpoint(str(trial / "checkpoint_000000")),
                  tune.Checkpoint(str(trial / "checkpoint_000009"))):  # none, older, pruned, gone
        assert restore_source(named, fs, str(trial)).path == newest
    assert restore_source(None, fs, str(tmp_path / "no-checkpoints-left")) is None


def test_a_checkpoint_tune_wrote_into_a_pruned_folder_survives_pruning_and_the_studys_end(tmp_path):
    """After a killed driver's restore, Tune numbers checkpoints from its older count and can write a finished
    trial's checkpoint into a folder pruned before (its pruned.txt still there). Pruning must keep that folder as
    a checkpoint and the study's end must not drop it: CI once saw a trial left with no checkpoint, its table
    read from Tune's result.json and missing epochs."""
    from types import SimpleNamespace

    import pyarrow.fs as pafs

    from study.records.trial_tables import _trial_history, trial_checkpoints
    from study.tuning.trainable import drop_pruned, prune_checkpoints

    trial = tmp_path / "init-lstm-1x48-word-aaaa0001"
    _checkpoint(trial / "checkpoint_000001", 3)  # the restored trial's final report, written over a pruned folder
    (trial / "checkpoint_000001" / "pruned.txt").write_text("pruned: checkpoint_000002 is this trial's checkpoint")
    _checkpoint(trial / "checkpoint_000002", 3)  # the same final epoch, from before the kill
    fs = pafs.LocalFileSystem()
    registered = str(trial / "checkpoint_000001")
    prune_checkpoints(SimpleNamespace(storage=SimpleNamespace(storage_filesystem=fs, trial_fs_path=str(trial)),
                                      checkpoint=SimpleNamespace(path=registered)))
    drop_pruned(fs, str(trial))
    assert [path for _, path in trial_checkpoints(fs, str(trial))] == [registered]
    assert [m["epoch"] for m in _trial_history(fs, str(trial))] == [1, 2, 3]
    assert sorted(p.name for p in trial.iterdir()) == ["checkpoint_000001"]  # the pruned copy is gone
