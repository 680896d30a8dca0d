"""The MLflow tracker on a real sqlite store: idempotent replays, discarded trials, RUNNING runs closed."""

from __future__ import annotations

from study.tracking import StudyTracker, sqlite_uri, study_runs


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
    assert b["metrics.val_CIDEr-D"] == 0.7 and b["tags.status"] == "stopped"
    assert again.pending == 0
