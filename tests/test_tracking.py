"""The MLflow tracker on a real sqlite store: idempotent replays, discarded trials, RUNNING runs closed."""

from __future__ import annotations

from pathlib import Path

from study.records.paths import sqlite_uri
from study.tracking import StudyTracker
from study.tracking.mlflow_store import study_runs


def test_replayed_journal_creates_no_duplicates_and_closes_every_run(tmp_path):
    uri = sqlite_uri(tmp_path / "mlflow.db")
    tracker = StudyTracker(uri, "exp", "exp", tmp_path / "study")
    tracker.start_study({"trials": 3}, {"git_commit": "x"})
    for trial in ("a", "b", "c"):
        tracker.trial_started(trial, f"init-lstm-1x64-word-{trial}", {"inject": "init", "lr": 0.01})
        tracker.trial_result(trial, {"val_CIDEr-D": 0.5, "epoch": 1}, step=1)
    tracker.trial_finished("a", "completed")

    # A new driver (after a crash) reads the same folder: trial "b" resumes into its own run, and "c",
    # which Tune lost with its last snapshot, is discarded.
    again = StudyTracker(uri, "exp", "exp", tmp_path / "study")
    again.start_study({"trials": 3}, {"git_commit": "x"})
    again.discard_trials(keep={"a", "b"})
    again.trial_started("b", "init-lstm-1x64-word-b", {"inject": "init", "lr": 0.01})
    again.trial_result("b", {"val_CIDEr-D": 0.7, "epoch": 2}, step=2)
    again.trial_finished("b", "stopped", "stopped by ASHA after 2 epochs")
    again.finish_study()

    # A third driver (resuming the finished study) must not trip over the discarded run.
    third = StudyTracker(uri, "exp", "exp", tmp_path / "study")
    third.start_study({"trials": 3}, {"git_commit": "x"})
    third.discard_trials(keep={"a", "b"})
    third.study_tags({"verdict": "competes"})
    third.finish_study()
    assert third.pending == 0

    parents, runs = study_runs(uri, "exp")
    assert len(parents) == 1 and parents.iloc[0]["status"] == "FINISHED" and parents.iloc[0]["tags.resumed"] == "true"
    assert sorted(runs["tags.trial_id"]) == ["a", "b"]
    assert (runs["status"] == "FINISHED").all()
    b = runs[runs["tags.trial_id"] == "b"].iloc[0]
    assert b["metrics.val_CIDEr-D"] == 70.0 and b["tags.status"] == "stopped"  # MLflow shows scores in points
    assert again.pending == 0


def test_confirm_runs_params_once_and_stopped_trials(tmp_path):
    from mlflow.tracking import MlflowClient

    from study.tracking import source_tags
    from study.tracking.mlflow_store import confirm_runs

    uri = sqlite_uri(tmp_path / "mlflow.db")
    folder = tmp_path / "study"
    tracker = StudyTracker(uri, "exp", "exp", folder)
    tracker.start_study({"trials": 1}, source_tags("study run", "does init compete?"),
                        dataset={"name": "shapes", "digest": "abc123", "source": "shapes.json"})
    tracker.trial_started("a", "init-a", {"inject": "init"})
    for step, score in ((1, 0.4), (2, 0.6), (3, 0.5)):
        tracker.trial_result("a", {"val_CIDEr-D": score, "params": 1234}, step=step)
    tracker.trial_finished("a", "stopped", "stopped by ASHA after 3 epochs", best=("val_CIDEr-D", "max"))
    (folder / "ckpt.pt").write_bytes(b"model")
    assert tracker.confirm_run("init-r1-s0", {"inject": "init", "seed": 1000}, {"test_CIDEr-D": 0.3},
                               [folder / "ckpt.pt"])

    # A second report (e.g. after `study decide` added a seed) logs only the new confirm run, and a replay of
    # the whole journal (lost bookkeeping of what was sent) duplicates nothing.
    again = StudyTracker(uri, "exp", "exp", folder)
    again.child_tags = source_tags("study report")  # as write_report does
    assert not again.confirm_run("init-r1-s0", {"inject": "init", "seed": 1000}, {"test_CIDEr-D": 0.3}, [])
    assert again.confirm_run("init-r1-s1", {"inject": "init", "seed": 1001}, {"test_CIDEr-D": 0.35}, [])
    (folder / "tracking_sent.json").unlink()
    replay = StudyTracker(uri, "exp", "exp", folder)
    assert replay.flush(force=True) and replay.pending == 0

    client = MlflowClient(uri)
    confirm = confirm_runs(uri, "exp")
    assert sorted(confirm["tags.mlflow.runName"]) == ["confirm-init-r1-s0", "confirm-init-r1-s1"]
    assert (confirm["status"] == "FINISHED").all()
    sources = confirm.sort_values("tags.mlflow.runName")["tags.mlflow.source.name"]
    assert list(sources) == ["study run", "study report"]
    first = confirm[confirm["tags.mlflow.runName"] == "confirm-init-r1-s0"].iloc[0]
    assert [a.path for a in client.list_artifacts(first["run_id"])] == ["ckpt.pt"]
    parents, trials = study_runs(uri, "exp")
    parent = client.get_run(parents.iloc[0]["run_id"])
    assert parent.data.tags["mlflow.note.content"] == "does init compete?"
    assert [d.dataset.digest for d in parent.inputs.dataset_inputs] == ["abc123"]
    trial = client.get_run(trials.iloc[0]["run_id"])
    assert trial.data.tags["status"] == "stopped" and "error" not in trial.data.tags
    assert trial.data.params["params"] == "1234" and "params" not in trial.data.metrics
    assert trial.data.metrics["best_val_CIDEr-D"] == 60.0 and trial.data.metrics["best_epoch"] == 2  # in points
    assert trial.data.tags["mlflow.source.name"] == "study run"


def test_a_run_whose_id_was_never_remembered_is_found_by_its_tags(tmp_path):
    """A driver killed between MLflow creating a trial's run and writing its id to mlflow_runs.json (seen in
    the kill test): the next driver finds the run by its trial_id tag, to discard it or to log into it, so
    nothing is left RUNNING and nothing is duplicated."""
    import json

    uri = sqlite_uri(tmp_path / "mlflow.db")
    killed = StudyTracker(uri, "exp", "exp", tmp_path / "study")
    killed.start_study({"trials": 2}, {})
    killed.trial_started("lost", "init-lstm-1x64-word-lost", {"inject": "init"})
    killed.trial_started("kept", "init-lstm-1x64-word-kept", {"inject": "init"})
    # The kill: the two runs exist in MLflow, but neither their ids nor the sent position reached the disk.
    runs_file = tmp_path / "study" / "mlflow_runs.json"
    remembered = json.loads(runs_file.read_text())
    runs_file.write_text(json.dumps({k: v for k, v in remembered.items() if k not in ("lost", "kept")}))
    first_event = (tmp_path / "study" / "tracking_journal.jsonl").read_bytes().split(b"\n")[0]
    (tmp_path / "study" / "tracking_sent.json").write_text(json.dumps({"sent": 1, "offset": len(first_event) + 1}))

    again = StudyTracker(uri, "exp", "exp", tmp_path / "study")
    again.start_study({"trials": 2}, {})
    again.discard_trials(keep={"kept"})
    again.trial_started("kept", "init-lstm-1x64-word-kept", {"inject": "init"})
    again.trial_finished("kept", "completed")
    again.finish_study()
    _, runs = study_runs(uri, "exp")
    assert list(runs["tags.trial_id"]) == ["kept"] and (runs["status"] == "FINISHED").all()
    assert again.store.runs["kept"] == remembered["kept"]  # the same run, not a second one


def test_the_journal_keeps_every_event_and_how_far_mlflow_got_across_processes(tmp_path):
    from study.tracking.journal import Journal

    journal = Journal(tmp_path / "j.jsonl", tmp_path / "sent.json")
    for step in (1, 2):
        journal.append({"kind": "trial_result", "trial": "a", "step": step})
    journal.append({"kind": "trial_end", "trial": "a", "reason": 'has "trial_result" in its text'})
    assert [e["step"] for e in journal.events("trial_result")] == [1, 2]  # by kind, not by substring
    first = journal.unsent()[0]
    journal.mark_sent(first)
    again = Journal(tmp_path / "j.jsonl", tmp_path / "sent.json")  # a new driver reads where the last one stopped
    assert again.pending == 2 and again.unsent()[0] == journal.unsent()[0] != first


def test_torn_and_garbled_journal_lines_are_named_and_skipped_never_a_server_problem(tmp_path, caplog):
    """What a kill or a full disk mid-append leaves: a torn last line, then (after the next append) a garbled
    line in the middle, and a line without an event kind. None of them may block the events after it from
    MLflow, or be reported as the server being down; the readers of the journal pass over them."""
    import logging

    from study.records.paths import StudyPaths
    from study.records.provenance import _study_start

    uri = sqlite_uri(tmp_path / "mlflow.db")
    folder = tmp_path / "study"
    tracker = StudyTracker(uri, "exp", "exp", folder)
    tracker.start_study({"trials": 2}, {"git_commit": "x"})
    tracker.trial_started("a", "init-lstm-1x64-word-a", {"inject": "init"})
    journal = tracker.journal.path
    with journal.open("ab") as fh:
        fh.write(b'{"kind": "trial_result", "trial": "a", "metr')  # torn mid-append
    again = StudyTracker(uri, "exp", "exp", folder)
    assert again.journal.torn_tail() and again.flush(force=True)  # the torn tail is left, not an error
    with caplog.at_level(logging.WARNING, logger="study.tracking"):
        again.journal.append({"trial": "a", "no": "kind"})  # a line that lost its kind
        again.trial_result("a", {"val_CIDEr-D": 0.4, "epoch": 1}, step=1)  # appended after the torn line
        again.trial_finished("a", "completed")
        again.finish_study()
    assert again.pending == 0 and not again.journal.torn_tail()
    skipped = [r.getMessage() for r in caplog.records if "is not a journal event" in r.getMessage()]
    assert len(skipped) == 2 and "line 3" in skipped[0] and "line 4" in skipped[1], skipped
    assert not [r for r in caplog.records if "not reachable" in r.getMessage()]
    parents, runs = study_runs(uri, "exp")
    assert parents.iloc[0]["status"] == "FINISHED"
    assert runs.iloc[0]["metrics.val_CIDEr-D"] == 40.0 and runs.iloc[0]["status"] == "FINISHED"
    assert _study_start(StudyPaths.at(folder))["kind"] == "study_start"  # the report's reader too


def _a_journalled_study(uri: str, folder) -> StudyTracker:
    """A small study's tracking: parent, two trials (one completed, one stopped), a confirm run, the end."""
    from study.tracking import source_tags

    tracker = StudyTracker(uri, "exp", "exp", folder)
    tracker.start_study({"trials": 2}, source_tags("study run"))
    for trial, score in (("a", 0.4), ("b", 0.2)):
        tracker.trial_started(trial, f"init-{trial}", {"inject": "init"})
        tracker.trial_result(trial, {"val_CIDEr-D": score}, step=1)
    tracker.trial_finished("a", "completed")
    tracker.trial_finished("b", "stopped", "stopped by ASHA after 1 epoch")
    (folder / "ckpt.pt").write_bytes(b"model")
    tracker.confirm_run("init-r1-s0", {"inject": "init", "seed": 1000}, {"test_CIDEr-D": 0.3}, [folder / "ckpt.pt"])
    tracker.finish_study()
    return tracker


def _assert_one_run_each(uri: str) -> None:
    from study.tracking.mlflow_store import confirm_runs

    parents, trials = study_runs(uri, "exp")
    assert len(parents) == 1 and parents.iloc[0]["status"] == "FINISHED"
    assert sorted(trials["tags.trial_id"]) == ["a", "b"] and (trials["status"] == "FINISHED").all()
    assert list(trials.sort_values("tags.trial_id")["metrics.val_CIDEr-D"]) == [40.0, 20.0]  # 0.4, 0.2 in points
    confirm = confirm_runs(uri, "exp")
    assert list(confirm["tags.mlflow.runName"]) == ["confirm-init-r1-s0"] and confirm.iloc[0]["status"] == "FINISHED"


def test_a_deleted_store_is_rebuilt_from_the_journal(tmp_path):
    """mlflow.db deleted after the study: `study report` (any sender) used to create an empty store and then fail
    ("Run with id=... not found"). The journal is the source of truth: the runs are made again from it. Each
    step runs in a process of its own, as the commands do (one process keeps the deleted file open)."""
    import subprocess
    import sys

    uri = sqlite_uri(tmp_path / "mlflow.db")
    folder = tmp_path / "study"

    def run(code: str) -> subprocess.CompletedProcess:
        prelude = "from tests.test_tracking import Path, StudyTracker, _a_journalled_study\n"
        done = subprocess.run([sys.executable, "-c", prelude + code],
                              capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    run(f"_a_journalled_study({uri!r}, Path({str(folder)!r}))")
    (tmp_path / "mlflow.db").unlink()
    rebuilt = run(f"t = StudyTracker({uri!r}, 'exp', 'exp', Path({str(folder)!r}))\n"
                  "t.study_tags({'verdict': 'competes'})\nassert t.pending == 0, t.pending")  # as `study report` does
    assert "no longer holds study exp's runs" in rebuilt.stderr and "rebuilding them" in rebuilt.stderr
    _assert_one_run_each(uri)
    assert study_runs(uri, "exp")[0].iloc[0]["tags.verdict"] == "competes"


def test_two_senders_of_one_journal_make_each_run_once(tmp_path):
    """Two `study sync` at once (each with its own view of what was sent) held the parent and every confirm run
    twice. sync now takes the study's lock; and sending finds the runs by their tags before making one."""
    import json

    from typer.testing import CliRunner

    from study.cli.app import app
    from study.records.lock import acquire
    from study.records.paths import StudyPaths

    uri = sqlite_uri(tmp_path / "mlflow.db")
    folder = tmp_path / "study"
    first = _a_journalled_study(uri, folder)
    # The second sender read the folder before the first wrote what it sent.
    (folder / "mlflow_runs.json").write_text("{}")
    (folder / "tracking_sent.json").write_text(json.dumps({"sent": 0, "offset": 0}))
    second = StudyTracker(uri, "exp", "exp", folder)
    assert second.flush(force=True) and second.store.runs["__study__"] == first.store.runs["__study__"]
    _assert_one_run_each(uri)

    (folder / "spec.yaml").write_text("name: exp\n")
    StudyPaths.at(folder).write_record("exp", folder / "spec.yaml", str(tmp_path), uri, "exp")
    with acquire(folder, "study run exp"):  # a driver (or another sync) holds the study
        result = CliRunner().invoke(app, ["sync", str(folder)])
    assert result.exit_code == 2 and "one driver per study" in " ".join(result.stderr.split()), result.output



def test_a_damaged_local_store_is_named_with_how_to_rebuild_it_not_as_a_server_that_is_down(tmp_path):
    """A local mlflow.db that MLflow refuses (here its schema version rewound, as a store whose creation a full disk
    cut short can be left) is a file to fix or delete, not a server to wait for: the warning says so and how the
    journal rebuilds it (test_a_deleted_store_is_rebuilt_from_the_journal proves the rebuild). A process of its own,
    as the commands are: MLflow checks a store's schema once per process."""
    import sqlite3
    import subprocess
    import sys

    uri = sqlite_uri(tmp_path / "mlflow.db")
    folder = tmp_path / "study"
    _a_journalled_study(uri, folder)
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        db.execute("UPDATE alembic_version SET version_num = '451aebb31d03'")  # an older schema than MLflow's
    code = ("from tests.test_tracking import Path, StudyTracker\n"
            f"t = StudyTracker({uri!r}, 'exp', 'exp', Path({str(folder)!r}))\n"
            "t.study_tags({'verdict': 'competes'})\nassert t.pending == 1, t.pending")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    said = " ".join(done.stderr.split())
    assert f"MLflow's store {uri} cannot be used" in said and "not reachable" not in said
    assert "a damaged or half-made store deleted, to be rebuilt from the journal" in said
    assert f"`study sync {folder}` sends them" in said


def test_the_reports_wall_times_count_side_by_side_work_once_and_the_gap_before_a_resume_not_at_all(tmp_path):
    """Issue 20 asks the report for the search's and the confirm stage's measured hours. Two trials train side by
    side (one 100 s epoch each, overlapping by 50 s), then the driver dies and is resumed an hour later for a
    third 60 s epoch: 150 + 60 s of search wall time, not the hour between. Two confirm runs overlap likewise."""

    from study.records.provenance import union_seconds, wall_time_rows
    from study.tracking.journal import Journal

    assert union_seconds([(0, 10), (5, 20), (30, 40), (32, 35)]) == 30
    journal = Journal(tmp_path / "j.jsonl", tmp_path / "sent.json")
    epoch = {"train_seconds": 80.0, "val_loss_seconds": 5.0, "decode_seconds": 10.0, "metric_seconds": 5.0}
    t0 = 1_800_000_000_000  # epoch milliseconds, as the tracker journals them
    journal.append({"kind": "trial_result", "trial": "a", "step": 1, "metrics": epoch, "time": t0 + 100_000})
    journal.append({"kind": "trial_result", "trial": "b", "step": 1, "metrics": epoch, "time": t0 + 150_000})
    journal.append({"kind": "trial_result", "trial": "a", "step": 2, "time": t0 + 3_750_000,
                    "metrics": {"train_seconds": 60.0, "val_CIDEr-D": 0.3}})
    confirm = [(t0 / 1000 + 4000, t0 / 1000 + 4600), (t0 / 1000 + 4300, t0 / 1000 + 5200)]  # two runs' spans, s
    rows = wall_time_rows(journal, confirm)
    # below an hour in minutes and seconds, not "0.06 h" (issue 34, item 9)
    assert rows["search wall time"] == "3 min 30 s while trials trained (3 trial-epochs, 4 min 20 s of trial time)"
    assert rows["confirm wall time"] == "20 min 00 s (2 runs, 25 min 00 s of run time)"
    assert wall_time_rows(Journal(tmp_path / "none.jsonl", tmp_path / "s.json"), []) == {}  # nothing ran yet
