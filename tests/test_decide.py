"""`study decide` end to end on a real (tiny) study: an inconclusive verdict gets one more seed per compared
method at each look, every look is recorded with the plan's level, and the report says what it took."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import study_command as _study


def _tiny_spec(tmp_path: Path, small_shapes, name: str, confirm: dict) -> Path:
    """Two barely trained methods (init, pre) whose captions score 0 on every test image."""
    spec_path = tmp_path / f"{name}.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": name,
        "dataset": {"kind": "shapes", "images": small_shapes.images, "image_size": small_shapes.image_size,
                    "seed": small_shapes.seed, "cache_dir": str(small_shapes.cache_dir)},
        "fixed": {"hidden": 8, "embed": 8, "min_count": 1, "batch_size": 160, "lr": 1e-6, "max_len": 4,
                  "val_images": 5},
        # dropout is searched only for init: a pre trial must not log it (MLflow shows only active parameters).
        "space": {"inject": {"choice": ["init", "pre"]}, "dropout": {"choice": [0.1], "when": {"inject": "init"}}},
        "stratify": "inject",
        "search": {"trials": 2, "seed": 0},
        "asha": {"max_epochs": 1, "grace_period": 1},
        "storage": str(tmp_path / "runs"),
        "confirm": {"seeds": 1, "epochs": 1, "beam_size": 1, **confirm},
    }, sort_keys=False))
    return spec_path


@pytest.mark.slow
def test_decide_adds_seeds_under_the_plan_and_the_report_says_so(tmp_path, small_shapes):
    # init - pre is exactly 0 with no spread; with margin 0 the interval [0, 0] neither clears nor falls below
    # it: inconclusive at every look, and decide must stop at max_seeds.
    spec_path = _tiny_spec(tmp_path, small_shapes, "decide", {"margin_points": 0.0, "max_seeds": 2})
    run = _study("run", str(spec_path), "--no-report", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    too_many = _study("decide", "decide", "--storage", str(tmp_path / "runs"), "--max-seeds", "5", cwd=tmp_path)
    assert too_many.returncode == 2 and "raising it to 5 now would void its error bound" in too_many.stderr

    decided = _study("decide", "decide", "--storage", str(tmp_path / "runs"), cwd=tmp_path)
    assert decided.returncode == 0, decided.stderr[-3000:]
    folder = tmp_path / "runs" / "decide"
    record = json.loads((folder / "decide.json").read_text())
    assert [look["seeds"] for look in record["looks"]] == [{"init": 1, "pre": 1}, {"init": 2, "pre": 2}]
    assert all(look["level"] == pytest.approx(1 - 0.05 / 2) for look in record["looks"])
    assert all(look["verdict"].startswith("inconclusive") for look in record["looks"])
    assert sorted(p.name for p in (folder / "confirm").glob("*.json")) == [
        "init-r1-s0.json", "init-r1-s1.json", "pre-r1-s0.json", "pre-r1-s1.json"]
    report = (folder / "report" / "report.md").read_text()
    assert "[97.5% CI]" in report
    assert "Not decided after 2 seeds per method, the plan's limit" in report
    _check_frames(folder)
    _check_export(folder, tmp_path)
    _check_mlflow(folder, tmp_path)


def _check_frames(folder: Path) -> None:
    """`study.load(...)`'s frames type each column as the config types it (issue 21): weight_decay 0.0 is a float,
    not Int64; a conditional parameter is <NA> where inactive, in every frame; counts are integers."""
    import pandas as pd

    import study

    loaded = study.load(str(folder))
    trials, runs, verdict = loaded.trials(), loaded.confirm_runs(), loaded.verdict()
    for frame in (trials, runs):
        assert pd.api.types.is_float_dtype(frame["weight_decay"]) and pd.api.types.is_float_dtype(frame["clip"])
        assert pd.api.types.is_integer_dtype(frame["hidden"]) and pd.api.types.is_bool_dtype(frame["seed_h"])
        assert pd.api.types.is_integer_dtype(frame["max_len"])  # fixed to 4 here
        assert pd.api.types.is_string_dtype(frame["cell"])
        pre = frame[frame["inject"] == "pre"]
        assert pre["dropout"].isna().all()  # searched only for init: inactive for pre, in both frames
    assert trials["val_images"].dtype == "Int64" and trials["val_captions"].isna().all()
    assert pd.api.types.is_integer_dtype(verdict["params"]) and pd.api.types.is_integer_dtype(verdict["epochs"])


@pytest.mark.slow
def test_decide_on_a_study_decided_at_95_percent_trains_nothing_unless_asked(tmp_path, small_shapes):
    """A verdict decided at the fixed 95% level (here: a margin no difference can exceed) is not re-judged at a
    plan's stricter level, which once called a "competes" study inconclusive and trained two more runs."""
    spec_path = _tiny_spec(tmp_path, small_shapes, "done", {"margin_points": 1000.0})
    run = _study("run", str(spec_path), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    folder = tmp_path / "runs" / "done"
    before = sorted(p.name for p in (folder / "confirm").glob("*.json"))
    assert before == ["init-r1-s0.json", "pre-r1-s0.json"]
    decided = _study("decide", "done", "--storage", str(tmp_path / "runs"), "--max-seeds", "3", cwd=tmp_path)
    assert decided.returncode == 0, decided.stderr[-3000:]
    assert "is already decided at the fixed 95% level: competes" in " ".join(decided.stdout.split())
    assert sorted(p.name for p in (folder / "confirm").glob("*.json")) == before
    assert not (folder / "decide.json").exists()


def _check_export(folder: Path, tmp_path: Path) -> None:
    """`study export` copies what a repository should hold of the study, and nothing trained."""
    import pandas as pd

    results = tmp_path / "results" / "decide"
    exported = _study("export", str(folder), str(results), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-2000:]
    names = {p.name for p in results.iterdir()}
    assert {"report.md", "report.html", "provenance.json", "spec.yaml", "verdict.csv", "decide.json",
            "leaderboard.csv", "trials.csv", "history.csv", "confirm_runs.csv", "test_scores.csv", "test_scores.md",
            "methods.png", "confirm_history.csv", "confirm_curves.png"} <= names
    assert not [n for n in names if n.endswith((".pt", ".npy"))]
    assert (results / "report.md").read_text() == (folder / "report" / "report.md").read_text()
    assert len(pd.read_csv(results / "leaderboard.csv")) == 2  # every search trial
    trials, history = pd.read_csv(results / "trials.csv"), pd.read_csv(results / "history.csv")
    assert set(history["trial_id"]) == set(trials["trial_id"])  # the learning curves join onto the parameters
    runs = pd.read_csv(results / "confirm_runs.csv")
    assert sorted(runs["run"]) == ["init-r1-s0", "init-r1-s1", "pre-r1-s0", "pre-r1-s1"]
    # Each confirm run's validation curve, every epoch once, and the report's judgement of its end from them.
    curves = pd.read_csv(results / "confirm_history.csv")
    assert curves.groupby("run")["epoch"].apply(list).to_dict() == {r: list(range(1, e + 1)) for r, e in
                                                                     zip(runs["run"], runs["epochs"])}
    report_text = (results / "report.md").read_text()
    assert "## Did training run long enough?" in report_text and "![confirm runs' validation curves]" in report_text
    assert "trained a single epoch or recorded no validation curve: there is no end to judge" in report_text
    scores = pd.read_csv(results / "test_scores.csv")  # per method: seeds, mean and sd of every test metric
    assert list(scores["method"]) == ["init", "pre"] and list(scores["seeds"]) == [2, 2]
    assert scores.loc[0, "CIDEr-D_mean"] == pytest.approx(runs[runs["method"] == "init"]["CIDEr-D"].mean())
    assert "| init | 2 |" in (results / "test_scores.md").read_text()
    origin = json.loads((results / "provenance.json").read_text())
    assert len(origin["search run by commit"]) >= 7 and origin["ray"] == "2.60.0"
    # the measured hours of each stage (issue 20): 2 trial-epochs, 4 confirm runs
    assert "while trials trained (2 trial-epochs" in origin["search wall time"], origin
    assert "(4 runs, " in origin["confirm wall time"], origin
    # the folder the spec's relative paths start from: here the spec lies in no repository, so absolute
    assert json.loads((results / "export.json").read_text())["spec_folder"] == str(tmp_path.resolve())

    # A reviewer re-checks a committed number with one command (issue 20): the run retrained from what the
    # export holds gives the same scores to the last digit; other data is refused, naming both fingerprints.
    again = _study("reproduce", str(results), "init-r1-s0", "--keep", str(tmp_path / "kept"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reproduced exactly" in again.stdout and "+0.0000" in again.stdout, again.stdout
    # --keep: the retrained model stays, and a reviewer captions a photo of their own with it (issue 31).
    kept = tmp_path / "kept" / "init-r1-s0.pt"
    assert f"checkpoint kept: {kept}" in " ".join(again.stdout.split()) and sorted(kept.parent.iterdir()) == [kept]
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "mine.png")
    captioned = _study("caption", str(tmp_path / "mine.png"), "--checkpoint", str(kept), cwd=tmp_path)
    assert captioned.returncode == 0 and captioned.stdout.startswith(f"{tmp_path / 'mine.png'}\t"), captioned.stderr
    origin_text = (results / "provenance.json").read_text()
    (results / "provenance.json").write_text(origin_text.replace(origin["dataset fingerprint"], "0" * 64))
    other = _study("reproduce", str(results), "init-r1-s0", cwd=tmp_path)
    assert other.returncode == 2 and "is not the one the study ran on" in " ".join(other.stderr.split())
    (results / "provenance.json").write_text(origin_text)

    # The destination: never inside the study, never mixed with other files (issue 22, item 7).
    report = (folder / "report" / "report.md").read_text()
    inside = _study("export", str(folder), str(folder / "report"), cwd=tmp_path)
    assert inside.returncode == 2 and "is inside the study folder" in inside.stderr, inside.stderr[-2000:]
    assert (folder / "report" / "report.md").read_text() == report and not (folder / "report" / "trials.csv").exists()
    again = _study("export", str(folder), str(results), cwd=tmp_path)
    assert again.returncode == 2 and "is not empty" in again.stderr and "--force" in again.stderr
    manifest = json.loads((results / "export.json").read_text())
    (results / "notes.txt").write_text("the user's own")
    (results / "old.csv").write_text("written by an earlier export")
    (results / "export.json").write_text(json.dumps({**manifest, "files": [*manifest["files"], "old.csv"]}))
    forced = _study("export", str(folder), str(results), "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert (results / "notes.txt").exists() and not (results / "old.csv").exists() and (results / "trials.csv").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my own report")
    clash = _study("export", str(folder), str(mine), "--force", cwd=tmp_path)
    assert clash.returncode == 2 and "report.md" in clash.stderr and (mine / "report.md").read_text() == "my own report"


def _check_mlflow(folder: Path, tmp_path: Path) -> None:
    """The study's MLflow store holds the answer and its evidence, and a copied study folder reads its own."""
    import shutil

    from mlflow.tracking import MlflowClient

    from study.records.paths import sqlite_uri
    from study.tracking.mlflow_store import confirm_runs, study_runs

    uri = sqlite_uri(folder / "mlflow.db")
    client = MlflowClient(uri)
    parents, trials = study_runs(uri, "decide")
    confirm = confirm_runs(uri, "decide")
    parent = client.get_run(parents.iloc[0]["run_id"])
    assert len(parents) == 1 and len(trials) == 2
    assert sorted(confirm["tags.mlflow.runName"]) == [
        "confirm-init-r1-s0", "confirm-init-r1-s1", "confirm-pre-r1-s0", "confirm-pre-r1-s1"]
    assert (confirm["tags.mlflow.parentRunId"] == parent.info.run_id).all()
    assert confirm["metrics.test_CIDEr-D"].notna().all() and (confirm["params.seed"] != "").all()
    one = confirm.iloc[0]
    # Each confirm run spans its real training and scoring (it used to last the milliseconds of its logging),
    # has per-epoch curves like a search trial, and says what made it.
    durations = (confirm["end_time"] - confirm["start_time"]).dt.total_seconds()
    assert (durations > 1).all(), durations
    # ... and the parent run lasts the whole study: search, confirm runs and report.
    assert parent.info.end_time >= confirm["end_time"].max().timestamp() * 1000
    assert [m.step for m in client.get_metric_history(one["run_id"], "val_loss")] == [1]
    assert client.get_run(one["run_id"]).data.tags["mlflow.note.content"].startswith("Confirm run: the search's")
    assert "metrics.system/train_seconds" in confirm and "metrics.train_seconds" not in confirm
    assert {a.path for a in client.list_artifacts(one["run_id"])} == {
        f"{one['tags.mlflow.runName'].removeprefix('confirm-')}{ext}" for ext in (".json", ".per_image.csv", ".pt")}

    # The verdict: a table artifact and a few headline metrics, not one metric per number.
    assert {"verdict.csv", "verdict.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.tags["verdict"].startswith("inconclusive")
    assert {"verdict.diff", "verdict.ci_low", "verdict.ci_high", "test_CIDEr-D.init", "test_CIDEr-D.pre"} <= set(
        parent.data.metrics) and len(parent.data.metrics) <= 8

    # Conventions: standard tags, the dataset input, only active conditional parameters, params once.
    for run in [parent, *(client.get_run(r) for r in trials["run_id"])]:
        assert run.data.tags["mlflow.source.name"] == "study run" and run.data.tags["mlflow.user"]
        assert len(run.data.tags["mlflow.source.git.commit"]) >= 7 and "git_commit" not in run.data.tags
    assert [d.dataset.name for d in parent.inputs.dataset_inputs] == ["shapes"]
    assert parent.data.tags["dataset_fingerprint"].startswith(parent.inputs.dataset_inputs[0].dataset.digest)
    by_method = {row["params.inject"]: row for _, row in trials.iterrows()}
    assert by_method["init"]["params.dropout"] == "0.1" and _missing(by_method["pre"].get("params.dropout"))
    assert "metrics.params" not in trials or trials["metrics.params"].isna().all()
    assert trials["params.params"].notna().all()

    # optuna.db as optuna-dashboard users expect (issue 21): real times, the curve, the links to MLflow.
    import optuna

    storage = f"sqlite:///{folder / 'optuna.db'}"
    exported = [t for name in ("decide.init", "decide.pre")
                for t in optuna.load_study(study_name=name, storage=storage).trials]
    assert sorted(t.user_attrs["trial_id"] for t in exported) == sorted(trials["tags.trial_id"])
    for t in exported:
        assert t.state.name == "COMPLETE" and t.intermediate_values.keys() == {1}
        assert t.user_attrs["mlflow_run_id"] in set(trials["run_id"])
        assert t.datetime_start < t.datetime_complete < parent_end(client, parent.info.run_id)

    # The same best trial per method as `study leaderboard` (each trial's best epoch).
    board = _study("leaderboard", str(folder), "--format", "csv", cwd=tmp_path)
    assert board.returncode == 0, board.stderr[-2000:]
    lines = [line.split(",") for line in board.stdout.strip().splitlines()]
    best = {row[lines[0].index("inject")]: row[lines[0].index("run")] for row in lines[1:]}
    ranked = trials.sort_values("metrics.best_val_CIDEr-D", ascending=False).groupby("params.inject").head(1)
    assert best == dict(zip(ranked["params.inject"], ranked["tags.mlflow.runName"]))

    # A copied study folder reads its own store (study.json names no absolute one), even with the original gone.
    assert json.loads((folder / "study.json").read_text())["tracking_uri"] is None
    copy = tmp_path / "elsewhere" / "decide"
    shutil.copytree(folder, copy)
    (tmp_path / "runs").rename(tmp_path / "gone")
    board = _study("leaderboard", str(copy), "--format", "csv", cwd=tmp_path)
    assert board.returncode == 0 and len(board.stdout.strip().splitlines()) == 3, board.stderr[-2000:]
    sync = _study("sync", str(copy), cwd=tmp_path)
    assert sync.returncode == 0 and sqlite_uri(copy / "mlflow.db") in sync.stdout, sync.stdout + sync.stderr


def parent_end(client, run_id: str):
    """When the study's parent run ended (its search's end), as a datetime."""
    import datetime

    return datetime.datetime.fromtimestamp(client.get_run(run_id).info.end_time / 1000)


def _missing(value) -> bool:
    return value is None or value != value


def test_reproduce_takes_the_spec_folder_export_recorded_from_the_repository_that_holds_the_export(tmp_path):
    """`study export` records where the spec's relative dataset paths start, inside its repository
    (``search_spaces``); `study reproduce` in a reviewer's clone takes that folder of the clone, so the README's
    command needs no --dataset-root. An export from before the key, or a clone without the folder: the export."""
    from study.stages.reproduce import spec_folder

    clone = tmp_path / "clone"
    (clone / ".git").mkdir(parents=True)
    export = clone / "results" / "flickr8k"
    export.mkdir(parents=True)
    manifest = {"study": "flickr8k_fair", "files": [], "spec_folder": "search_spaces"}
    (export / "export.json").write_text(json.dumps(manifest))
    assert spec_folder(export) == export  # the clone has no search_spaces/
    (clone / "search_spaces").mkdir()
    assert spec_folder(export) == clone / "search_spaces"
    (export / "export.json").write_text(json.dumps({"study": "flickr8k_fair", "files": []}))
    assert spec_folder(export) == export
