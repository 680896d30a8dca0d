"""A study's trials read from Tune's folders as plain JSON: no Ray, no MLflow, no pickle.

A trial folder (Tune's layout, ``<study>/tune/<run name>-<trial id>/``) holds Tune's ``params.json`` and
``result.json``, and one ``checkpoint_NNNNNN/`` per reported epoch, written by the trial itself
(``study.tuning.trainable``): ``checkpoint.pt`` and ``history.json``, the list of the trial's epochs so far.
``tune/experiment_state-*.json`` is Tune's snapshot of which trials exist and how they stand.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from study.config import TrialConfig
from study.records import missing
from study.records.paths import StudyPaths
from study.spec import REPORTED, StudySpec

HISTORY_FILE = "history.json"  # in every trial checkpoint: the list of its epochs' reported metrics
PRUNED_NOTE = "pruned.txt"  # all that is left in a checkpoint folder pruned while a snapshot may name it
DIVERGED_NOTE = "diverged.txt"  # in a trial folder: why it diverged (the trial ended there, errored)


def diverged_reason(fs, trial_fs_path: str) -> str | None:
    """The divergence note of a trial folder (local or s3://), or None when the trial did not diverge."""
    text = _read_text(fs, f"{trial_fs_path}/{DIVERGED_NOTE}")
    return text.strip() or None


def experiment_path(spec: StudySpec) -> str:
    """Tune's experiment folder of a study (local or a bucket URI)."""
    return StudyPaths.of(spec.storage, spec.name).tune


def trial_checkpoints(fs, trial_fs_path: str) -> list[tuple[int, str]]:
    """(epoch, path) of a trial folder's complete checkpoints, oldest first.

    Ordered by the epoch in each one's ``history.json``, not by folder name: a trial restored from a checkpoint
    newer than Tune knew of is numbered on from Tune's count. A checkpoint cut short by a kill (no readable
    history, or a checkpoint.pt that is not a whole zip archive) is left out."""
    import zipfile

    from study.trial.checkpoints import CHECKPOINT_FILE

    found = []
    for path in checkpoint_folders(fs, trial_fs_path):
        try:
            with fs.open_input_stream(f"{path}/{HISTORY_FILE}") as fh:
                epochs = json.loads(fh.read())
            with fs.open_input_file(f"{path}/{CHECKPOINT_FILE}") as fh, zipfile.ZipFile(fh) as archive:
                complete = archive.testzip() is None
        except (OSError, ValueError, zipfile.BadZipFile):
            continue
        if complete and epochs:
            found.append((int(epochs[-1]["epoch"]), path))
    return sorted(found)


def checkpoint_folders(fs, trial_fs_path: str) -> list[str]:
    """Paths of a trial folder's ``checkpoint_NNNNNN`` folders, oldest first (local folder or s3://)."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(trial_fs_path, allow_not_found=True))
    return sorted(i.path for i in infos
                  if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))


def load_trial_tables(spec: StudySpec):
    """(trials, history) DataFrames of a study's search, read from the study's own storage; no MLflow, and no
    pickle (``tune.ExperimentAnalysis`` would unpickle parts of the experiment state).

    Which trials the study has, their configs and Tune's status come from the newest experiment-state file,
    read as plain JSON; each trial's epochs come from ``history.json`` in its newest checkpoint, which the trial
    writes itself and a driver crash cannot leave behind (Tune's own result files are copied from the driver
    and can miss epochs after a crash). ``trials``: one row per trial with its parameters, how it ended, its
    best epoch's metrics (best by ``spec.metric``: the one definition of a trial's score, as Optuna is told)
    and total training seconds. ``history``: one row per trial-epoch.
    """
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(experiment_path(spec))
    rows, histories = [], []
    for trial in experiment_trials(spec):
        trial_id, config, folder = trial["trial_id"], trial["config"], f"{root}/{trial['relative_logdir']}"
        history = _trial_history(fs, folder)
        cfg = spec.trial_config(config)
        row: dict[str, Any] = {"trial_id": trial_id, "run": f"{spec.run_name(config)}-{trial_id}",
                               "arm": spec.arm_of(config)}
        row.update(cfg.model_dump(mode="json", exclude={"dataset"}))
        for name in spec.space:  # a conditional parameter this trial never sampled has no value
            if name not in config:
                row[name] = None
        epochs = max((int(m["epoch"]) for m in history), default=0)
        diverged = diverged_reason(fs, folder) if trial["status"] == "TERMINATED" else None
        if trial["status"] == "ERROR" or diverged:
            row["status"] = "errored"
            row["error"] = (diverged or last_line(_read_text(fs, f"{folder}/error.txt")))[:300]
        elif trial["status"] == "TERMINATED":
            row["status"] = "completed" if epochs >= cfg.epochs else "stopped"
        else:
            row["status"] = trial["status"].lower()
        row["epochs"] = epochs  # trained; the configuration's schedule length is schedule_epochs
        row["schedule_epochs"] = cfg.epochs
        frame = pd.DataFrame(history, columns=[k for k in REPORTED if any(k in m for m in history)])
        if spec.metric in frame and frame[spec.metric].notna().any():
            best = frame.loc[frame[spec.metric].idxmax() if spec.mode == "max" else frame[spec.metric].idxmin()]
            row.update({k: float(best[k]) for k in REPORTED if k in best and k != "epoch"})
            row["best_epoch"] = int(best["epoch"])
            row["train_seconds"] = float(frame["train_seconds"].sum())
            frame.insert(0, "inject", row["inject"])
            frame.insert(0, "arm", row["arm"])
            frame.insert(0, "trial_id", trial_id)
            histories.append(frame)
        rows.append(row)
    history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    return pd.DataFrame(rows), history


def space_value(row: Any, name: str) -> Any:
    """A trial row's value of searched parameter ``name``: its table holds the epochs it *trained* as ``epochs``
    and its configuration's schedule length (a searched ``epochs``) as ``schedule_epochs``."""
    if name == "epochs" and "schedule_epochs" in row:
        return row["schedule_epochs"]
    return row.get(name)


def _trial_history(fs, folder: str) -> list[dict[str, Any]]:
    """A trial's reported epochs: ``history.json`` of its newest checkpoint, or, for a study started before
    checkpoints carried one, Tune's ``result.json`` (JSON lines; the last report of an epoch wins)."""
    import pyarrow.fs as pafs

    found = trial_checkpoints(fs, folder)
    if found and fs.get_file_info(f"{found[-1][1]}/{HISTORY_FILE}").type == pafs.FileType.File:
        return read_json(fs, f"{found[-1][1]}/{HISTORY_FILE}")
    if fs.get_file_info(f"{folder}/result.json").type != pafs.FileType.File:
        return []
    with fs.open_input_stream(f"{folder}/result.json") as fh:
        results = [json.loads(line) for line in fh.read().decode().splitlines() if line.strip()]
    by_epoch = {int(r["epoch"]): {k: r[k] for k in REPORTED if k in r} for r in results if "epoch" in r}
    return [by_epoch[e] for e in sorted(by_epoch)]


def experiment_states(spec: StudySpec) -> tuple[Any, list[str]]:
    """(filesystem, paths) of Tune's experiment-state snapshots of a study, oldest first (one per session)."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(experiment_path(spec))
    return fs, sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
                      if i.base_name.startswith("experiment_state-") and i.base_name.endswith(".json"))


def experiment_trials(spec: StudySpec) -> list[dict[str, Any]]:
    """The trials of Tune's newest experiment-state snapshot (id, config, status, folder), read as plain JSON:
    the pickled fields inside (Tune's ``CLOUDPICKLE_FALLBACK`` values) stay unread strings."""
    fs, states = experiment_states(spec)
    if not states:
        raise FileNotFoundError(f"no Tune experiment state in {experiment_path(spec)}: the study has not started "
                                "a trial yet")
    return [json.loads(json_state) for json_state, _ in read_json(fs, states[-1])["trial_data"]]


def read_json(fs, path: str) -> Any:
    with fs.open_input_stream(path) as fh:
        return json.loads(fh.read())


def _read_text(fs, path: str) -> str:
    try:
        with fs.open_input_stream(path) as fh:
            return fh.read().decode(errors="replace")
    except (FileNotFoundError, OSError):
        return ""


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:2000] if lines else "unknown error"


# ----- the trials the confirm stage retrains ------------------------------------------------------------------
class NoScoredTrial(ValueError):
    """No trial of the search reported the spec's metric: nothing to confirm (the message says why)."""


def confirmed_trials(spec: StudySpec, trials: pd.DataFrame) -> pd.DataFrame:
    """The search trials the confirm stage retrains: each method's best ``top_k`` by the spec's metric (each
    trial scored by its best epoch), with ``method, config_rank, trial_id``, the metric and the searched
    parameters (None where a conditional one was not sampled). Raises ``NoScoredTrial`` when no trial has a
    score."""
    done = trials[trials["status"] != "errored"] if "status" in trials else trials
    if spec.metric not in done or done[spec.metric].isna().all():
        raise NoScoredTrial(_why_unscored(spec, trials))
    rows = []
    arm = done["arm"] if "arm" in done else done["inject"]  # the arm a trial lies in (its method, for older tables)
    for method in spec.methods:
        best = done[arm == method].sort_values(spec.metric, ascending=spec.mode == "min")
        for rank, (_, row) in enumerate(best.head(spec.confirm.top_k).iterrows(), start=1):
            rows.append({"method": method, "config_rank": rank, "trial_id": row.get("trial_id"),
                         spec.metric: row.get(spec.metric),
                         **{k: (None if missing(space_value(row, k)) else space_value(row, k))
                            for k in spec.space}})  # inject too: an arm's name is not an inject value
    return pd.DataFrame(rows, columns=None if rows else ["method", "config_rank", "trial_id"])


def _why_unscored(spec: StudySpec, trials: pd.DataFrame) -> str:
    """One sentence: how many trials ran, how they ended, and the errors' reasons."""
    if trials.empty:
        return (f"study {spec.name}: no trial ran, so no trial produced a score ({spec.metric}) to confirm "
                "(a time budget spent before the first trial started?)")
    counts = trials["status"].value_counts().to_dict() if "status" in trials else {}
    ended = ", ".join(f"{n} {status}" for status, n in counts.items())
    text = f"study {spec.name}: none of its {len(trials)} trials produced a score ({spec.metric}) to confirm: {ended}"
    if "error" in trials:
        reasons = trials["error"].dropna().value_counts()
        text += "; errors: " + "; ".join(f"{reason} ({n}x)" for reason, n in reasons.head(3).items())
    if counts.get("stopped") or counts.get("completed"):
        text += "; the others ended before finishing an epoch (time budget spent?)"
    return text


# ----- the confirm runs the trial tables call for -------------------------------------------------------------
def confirm_configs(spec: StudySpec, trials: pd.DataFrame, *, seeds: range | None = None,
                    methods: list[str] | None = None) -> list[tuple[str, int, int, TrialConfig]]:
    """(method, rank, seed, config) of every confirm run: the best ``top_k`` trials of each method, with
    ``seeds`` (default: the spec's ``confirm.seeds`` first ones) for ``methods`` (default: all)."""
    runs = []
    chosen = confirmed_trials(spec, trials)
    # One rule for every arm: each run ends with its best validation epoch's model (or its last), chosen on the
    # study's metric decoded with the test's beam, before the test split is read (study.trial.training.BestEpoch).
    selection = {"select_metric": spec.metric if spec.confirm.select == "best_val" else None}
    if spec.confirm.select == "best_val":
        selection.update(val_beam_size=spec.confirm.beam_size, val_images=spec.confirm.val_images)
    for _, row in chosen[chosen["method"].isin(methods or spec.methods)].iterrows():
        sampled = {k: _plain(row[k]) for k in spec.space if k in row and not missing(row[k])}
        # The schedule length: confirm.epochs, else the configuration's own (searched), else the search's.
        epochs = spec.confirm.epochs or int(sampled.get("epochs", spec.asha.max_epochs))
        for seed in seeds if seeds is not None else range(spec.confirm.seeds):
            cfg = spec.trial_config({**sampled, "seed": 1000 + seed, "epochs": epochs,
                                     "beam_size": spec.confirm.beam_size, **selection})
            runs.append((row["method"], int(row["config_rank"]), seed, cfg))
    return runs


def _plain(value: Any) -> Any:
    """A frame cell as a config field wants it (numpy scalars to Python numbers)."""
    return value.item() if hasattr(value, "item") else value


def run_name(method: str, rank: int, seed: int) -> str:
    return f"{method}-r{rank}-s{seed}"
