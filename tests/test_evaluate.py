"""`study evaluate` (issue 20, item 2); the pooled interval itself is tested in `test_pooled.py`.

* end to end on a real (small) shapes study with confirm runs, evaluated on a shapes dataset of another seed
  and size: per-run scores equal to scoring the checkpoint's captions directly, the verdict on that set, a
  rerun that recomputes nothing, the report's section, the export's files and MLflow's metrics;
* coco-mini (skipped when absent): references with words the shapes model never saw are scored as raw text.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import REPO, journal_events, study_spec
from tests.helpers import study_command as _study
from tests.helpers import study_in_process as _cli

COCO_MINI = REPO.parent / "shared" / "data" / "coco-mini" / "dataset_coco_mini.json"


# ----- (a) end to end on a real study -----------------------------------------------------------------------
def _results(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((folder / "evaluate" / "shapes-b" / "runs").glob("*.json"))}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, small_shapes, feature_cache_dir):
    """A small real study (init and merge, one confirm seed each, reported), then `study evaluate` on the train
    split of a shapes dataset of another seed and size, run twice; then `study export`."""
    from types import SimpleNamespace

    from study.config import ShapesDataset
    from study.data.shapes import ensure_shapes

    tmp = tmp_path_factory.mktemp("evaluate")
    spec_path = study_spec(tmp, "crossdata", small_shapes, search={"trials": 2, "seed": 1},
                           asha={"max_epochs": 2, "grace_period": 2, "reduction_factor": 2},
                           confirm={"top_k": 1, "seeds": 1, "epochs": 2, "beam_size": 2, "margin_points": 5})
    run = _study("run", str(spec_path), cwd=tmp)
    assert run.returncode == 0, run.stderr[-3000:]
    rerun = _study("run", str(spec_path), cwd=tmp)  # refused: the study exists
    folder = tmp / "runs" / "crossdata"
    other = ensure_shapes(ShapesDataset(images=50, image_size=64, seed=8, cache_dir=feature_cache_dir), progress=False)
    command = ("evaluate", str(folder), str(other), "--split", "train", "--name", "shapes-b")
    first = _cli(*command)
    assert first.exit_code == 0, (first.output[-3000:], first.exception)
    results = _results(folder)
    stamps = {p.name: p.stat().st_mtime_ns for p in (folder / "evaluate" / "shapes-b" / "runs").glob("*.json")}
    report_stamp = (folder / "report" / "report.md").stat().st_mtime_ns
    again = _cli(*command)
    after_again = (_results(folder), {p.name: p.stat().st_mtime_ns for p in (folder / "evaluate" / "shapes-b" /
                                                                          "runs").glob("*.json")})
    # An evaluation stopped after its first run: the other run's result is missing, and only it is scored again.
    (folder / "evaluate" / "shapes-b" / "runs" / "merge-r1-s0.json").unlink()
    resumed = _cli(*command, "--no-report")
    exported = _cli("export", folder, tmp / "results")
    return SimpleNamespace(tmp=tmp, folder=folder, other=other, first=first, again=again, results=results,
                           stamps=stamps, report_stamp=report_stamp, after_again=after_again, resumed=resumed,
                           exported=exported, run=run, rerun=rerun)


@pytest.mark.slow
def test_evaluate_scores_every_confirm_run_as_scoring_its_checkpoints_captions_directly_does(evaluated):
    from study.trial.checkpoints import load_checkpoint
    from study.trial.inference import caption_files
    from study.trial.metrics import score_captions_per_image

    folder = evaluated.folder
    assert "2 runs scored, 0 finished ones reused" in " ".join(evaluated.first.stdout.split())
    assert sorted(evaluated.results) == sorted(p.name for p in (folder / "confirm").glob("*.json"))
    manifest = json.loads((folder / "evaluate" / "shapes-b" / "set.json").read_text())
    assert manifest["split"] == "train" and manifest["images"] == 40 and len(manifest["references"]) == 40
    for number, (name, text) in enumerate(sorted(evaluated.results.items())):
        result = json.loads(text)
        checkpoint = folder / "confirm" / name.replace(".json", ".pt")
        beam = load_checkpoint(checkpoint)["config"]["beam_size"]
        assert result["beam_size"] == beam == 2  # the confirm stage's beam
        # The checkpoint captions the image files themselves (encoder on the files, not the feature cache).
        direct = [caption for _, caption in caption_files(checkpoint, [Path(p) for p in manifest["image_paths"]],
                                                          beam_size=beam)]
        assert result["captions"] == direct and len(direct) == 40
        refs = dict(enumerate(manifest["references"]))
        scores, per_image = score_captions_per_image(refs, dict(enumerate(direct)), full=number == 0)
        for metric, value in scores.items():
            if value == value:  # SPICE is NaN offline
                assert result["scores"][metric] == pytest.approx(value, abs=1e-12), metric
        for metric, by_image in per_image.items():
            assert result["per_image"][metric] == {str(k): pytest.approx(v, abs=1e-12) for k, v in by_image.items()}
        assert set(result["per_image"]) >= {"CIDEr-D", "BLEU-4", "METEOR", "ROUGE-L"}
        assert 0 < result["scores"]["BLEU-1"] <= 1 and np.isfinite(result["scores"]["METEOR"])


@pytest.mark.slow
def test_without_a_terminal_a_study_prints_plain_lines_and_a_rerun_is_refused_before_its_header(evaluated):
    """Issue 34 item 5, as `study run > log 2>&1` sees it (stdout and stderr are pipes here): one line per ended
    trial and per confirm run with an ETA, never a bar's \\r frames; the space as a table; the verdict wrapped;
    and `study run` of the existing study answers with its refusal alone."""
    run = evaluated.run
    assert "\r" not in run.stdout + run.stderr
    err = run.stderr.splitlines()
    trials = [line for line in err if line.startswith("search crossdata: ")]
    assert [line.split(" trials done")[0] for line in trials] == ["search crossdata: 1/2", "search crossdata: 2/2"]
    assert "elapsed, about" in trials[0] and trials[0].endswith(" left") and "best val_CIDEr-D: " in trials[0]
    runs = [line for line in err if line.startswith("confirm runs: ")]
    assert [line.split(" runs done")[0] for line in runs] == ["confirm runs: 1/2", "confirm runs: 2/2"]
    assert runs[0].endswith(" left") and ("(init-r1-s0)" in runs[0] or "(merge-r1-s0)" in runs[0])
    out = run.stdout.splitlines()
    header = next(i for i, line in enumerate(out) if line.split()[:3] == ["searched", "kind", "values"])
    assert out[header + 1].split()[:2] == ["inject", "choice"] and "{'type'" not in run.stdout
    start = next(i for i, line in enumerate(out) if line.startswith("verdict: "))
    end = next(i for i, line in enumerate(out) if line.startswith("report: "))
    assert end - start > 2 and all(len(line) <= 100 for line in out[start:end])
    rerun = evaluated.rerun
    assert rerun.returncode == 2 and "study crossdata already exists" in " ".join(rerun.stderr.split())
    assert rerun.stdout == "", rerun.stdout  # no plan printed before the refusal


@pytest.mark.slow
def test_a_second_evaluate_of_the_same_dataset_recomputes_nothing(evaluated):
    again = evaluated.again
    assert again.exit_code == 0, (again.output[-3000:], again.exception)
    assert "0 runs scored, 2 finished ones reused" in " ".join(again.stdout.split())
    results, stamps = evaluated.after_again
    assert results == evaluated.results and stamps == evaluated.stamps
    assert (evaluated.folder / "report" / "report.md").stat().st_mtime_ns == evaluated.report_stamp
    # Resumed after losing one run's result: only that run is scored, to the same captions and scores.
    resumed = evaluated.resumed
    assert resumed.exit_code == 0 and "1 runs scored, 1 finished ones reused" in " ".join(resumed.stdout.split())
    now = {name: json.loads(text) for name, text in _results(evaluated.folder).items()}
    before = {name: json.loads(text) for name, text in evaluated.results.items()}
    assert now["init-r1-s0.json"] == before["init-r1-s0.json"]
    for key in ("captions", "scores", "per_image", "checkpoint_sha256", "dataset_fingerprint"):
        assert json.dumps(now["merge-r1-s0.json"][key]) == json.dumps(before["merge-r1-s0.json"][key]), key  # NaN
    # ... and MLflow got each run's scores once.
    sent = [e for e in journal_events(evaluated.folder) if e["kind"] == "confirm_metrics"]
    assert sorted(e["key"] for e in sent) == ["confirm/init-r1-s0", "confirm/merge-r1-s0"]


@pytest.mark.slow
def test_the_verdict_on_the_other_dataset_is_a_frame_the_report_a_section_mlflow_metrics(evaluated):
    from mlflow.tracking import MlflowClient

    import study
    from study.records.paths import sqlite_uri
    from study.tracking.mlflow_store import confirm_runs

    folder = evaluated.folder
    loaded = study.load(str(folder))
    runs = loaded.evaluations()
    assert sorted(runs["run"]) == ["init-r1-s0", "merge-r1-s0"] and set(runs["dataset"]) == {"shapes-b"}
    assert (runs["images"] == 40).all() and runs["CIDEr-D"].notna().all()
    verdict = loaded.evaluation_verdict("shapes-b")
    assert list(verdict.index) == ["init", "merge"] and (verdict["images"] == 40).all()
    assert verdict.attrs["best_other"] == "merge" and verdict.attrs["dataset"] == "shapes-b"
    assert verdict.attrs["verdict"] in ("competes", "does not compete", "inconclusive")
    per_image = loaded.evaluation_per_image("shapes-b")
    assert len(per_image) == 80 and verdict.loc["init", "CIDEr-D"] == pytest.approx(
        per_image[per_image["method"] == "init"]["CIDEr-D"].mean())
    pooled = loaded.pooled_verdict()
    assert list(pooled["set"]) == ["shapes test (the study's)", "shapes-b", "pooled"]
    assert pooled.attrs["other"] == "merge" and isinstance(pooled.attrs["decides"], bool)

    html = (folder / "report" / "report.html").read_text()
    assert "Other photos: shapes-b" in html and "Verdict on shapes-b" in html
    assert "Pooled verdict over every test set" in html and "The pooled evidence" in html
    assert (folder / "report" / "gallery-shapes-b.png").is_file()
    assert "gallery-shapes-b.png" in (folder / "report" / "report.md").read_text()

    uri = sqlite_uri(folder / "mlflow.db")
    confirm = confirm_runs(uri, "crossdata").set_index("tags.mlflow.runName")
    for name, text in evaluated.results.items():
        result, row = json.loads(text), confirm.loc["confirm-" + name.removesuffix(".json")]
        for metric in ("CIDEr-D", "BLEU-4", "METEOR", "ROUGE-L"):
            # the record keeps 0..1; MLflow shows points, as every other place
            assert row[f"metrics.shapes-b/{metric}"] == pytest.approx(100 * result["scores"][metric])
        artifacts = {a.path for a in MlflowClient(uri).list_artifacts(row["run_id"], "evaluate/shapes-b")}
        assert artifacts == {f"evaluate/shapes-b/{name}"}


@pytest.mark.slow
def test_export_carries_the_evaluated_datasets(evaluated):
    assert evaluated.exported.exit_code == 0, evaluated.exported.output[-3000:]
    results = evaluated.tmp / "results"
    said = int(evaluated.exported.stdout.split("wrote ")[1].split(" files")[0])
    assert said == len([p for p in results.iterdir() if p.is_file()])  # it said 17 and wrote 18 (issue 34, 9)
    runs = pd.read_csv(results / "evaluations.csv")
    assert sorted(runs["run"]) == ["init-r1-s0", "merge-r1-s0"] and set(runs["dataset"]) == {"shapes-b"}
    verdicts = pd.read_csv(results / "evaluation_verdicts.csv")
    assert list(verdicts["method"]) == ["init", "merge"] and set(verdicts["dataset"]) == {"shapes-b"}
    assert list(pd.read_csv(results / "pooled_verdict.csv")["set"])[-1] == "pooled"
    assert (results / "gallery-shapes-b.png").is_file()
    assert {"evaluations.csv", "evaluation_verdicts.csv", "pooled_verdict.csv"} <= set(
        json.loads((results / "export.json").read_text())["files"])


@pytest.mark.slow
def test_evaluate_fails_naming_what_and_where(evaluated, tmp_path):
    from study.context import StudyContext
    from study.records.paths import StudyPaths
    from study.stages.evaluate import EvaluateError, run_evaluate
    from study.study import Study

    folder = evaluated.folder
    missing = _cli("evaluate", folder, tmp_path / "nope.json")
    assert missing.exit_code == 2 and f"{tmp_path / 'nope.json'} does not exist" in " ".join(missing.stderr.split())
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    bad = _cli("evaluate", folder, broken)
    assert bad.exit_code == 2 and f"{broken}: not valid JSON" in " ".join(bad.stderr.split())
    (tmp_path / "images").mkdir()
    lost = tmp_path / "lost.json"
    lost.write_text(json.dumps({"dataset": "lost", "images": [
        {"filename": "gone.jpg", "split": "test", "sentences": [{"raw": "a photo"}]}]}))
    gone = _cli("evaluate", folder, lost)
    assert gone.exit_code == 2 and "gone.jpg" in gone.stderr and "does not exist" in gone.stderr
    no_split = _cli("evaluate", folder, evaluated.other, "--split", "restval")
    assert no_split.exit_code == 2 and "the split 'restval' has no images; its splits: train (40 images)" in " ".join(
        no_split.stderr.split())
    wrong_split = _cli("evaluate", folder, evaluated.other, "--name", "shapes-b")
    assert wrong_split.exit_code == 2 and "pass --name" in " ".join(wrong_split.stderr.split())
    for result in (missing, bad, gone, no_split, wrong_split):
        assert "Traceback" not in result.output
    spec = Study.open(folder).spec
    with pytest.raises(EvaluateError, match="has no finished confirm runs in .*confirm: `study report"):
        unconfirmed = StudyContext(spec, folder / "spec.yaml", StudyPaths.at(tmp_path / "unconfirmed"))
        run_evaluate(unconfirmed, evaluated.other, track=False)
    helped = _cli("evaluate", "--help")
    assert helped.exit_code == 0 and "coco-caption" in helped.stdout and "--split" in helped.stdout


# ----- (c) coco-mini: raw references, words the model never saw --------------------------------------------
@pytest.mark.slow
@pytest.mark.realdata
def test_coco_mini_references_are_scored_as_raw_text_with_words_outside_the_vocabulary(evaluated, tmp_path):
    if not COCO_MINI.is_file():
        pytest.skip(f"coco-mini not found at {COCO_MINI}")
    from study.data.tokens import Vocab, word_tokens
    from study.stages.evaluate import run_evaluate
    from study.study import Study
    from study.trial.checkpoints import load_checkpoint
    from study.trial.metrics import score_captions, score_captions_per_image

    found = Study.open(evaluated.folder)
    # One confirm run keeps it cheap (the full suite's METEOR costs ~11 s a run).
    outcome = run_evaluate(found, COCO_MINI, runs=["init-r1-s0"], progress=False, track=False)
    assert outcome.name == "coco-mini" and outcome.computed == ["init-r1-s0"]
    manifest = json.loads((outcome.folder / "set.json").read_text())
    assert manifest["images"] == 308
    refs = dict(enumerate(manifest["references"]))
    result = json.loads((outcome.folder / "runs" / "init-r1-s0.json").read_text())
    vocab = Vocab.from_dict(load_checkpoint(evaluated.folder / "confirm" / "init-r1-s0.pt")["vocab"])
    words = [w for captions in refs.values() for c in captions for w in word_tokens(c)]
    unseen = [w for w in words if w not in vocab.stoi]
    assert len(unseen) > 0.5 * len(words)  # the shapes vocabulary lacks most of COCO's words
    # The stored scores are pycocoevalcap's on the raw references (Python PTB tokenizer: no Java needed here) ...
    hyps = dict(enumerate(result["captions"]))
    scores, per_image = score_captions_per_image(refs, hyps)
    assert result["scores"]["CIDEr-D"] == pytest.approx(scores["CIDEr-D"], abs=1e-12)
    assert result["scores"]["BLEU-4"] == pytest.approx(scores["BLEU-4"], abs=1e-12)
    assert result["per_image"]["CIDEr-D"] == {str(k): pytest.approx(v, abs=1e-12)
                                             for k, v in per_image["CIDEr-D"].items()}
    # ... not those of references mapped through the model's vocabulary (unseen words as <unk>).
    through_vocab = {k: [vocab.decode(vocab.encode(c, 50)) for c in captions] for k, captions in refs.items()}
    assert score_captions(through_vocab, hyps)["CIDEr-D"] != pytest.approx(scores["CIDEr-D"], abs=1e-6)
    # One method scored there: a verdict with nothing to compare, said so rather than failed; the report names the
    # confirm run not scored there.
    assert found.evaluation_verdict("coco-mini").attrs["verdict"] == "not available"
    from study.records.verdicts import report_blocks
    from study.registry import method_colors, method_roles

    blocks = report_blocks(found.paths, found.spec, found.per_image(), tmp_path, level=0.95, roles=method_roles(),
                           colors=method_colors())
    assert any("1 confirm run is not scored on coco-mini" in str(b) and "merge-r1-s0" in str(b) for b in blocks)
    # The README's other way of pointing at the photos (images_root above coco-mini/) finds the same files: reused.
    again = run_evaluate(found, COCO_MINI, images_root=COCO_MINI.parents[1],
                         runs=["init-r1-s0"], progress=False, track=False)
    assert again.computed == [] and again.reused == ["init-r1-s0"]


@pytest.mark.slow
def test_study_verify_recomputes_every_interval_from_the_export_alone_and_names_an_edited_cell(evaluated, tmp_path):
    """Issue 31, section 5: the export carries per-image scores and the bootstrap's settings; `study verify`
    recomputes the report's intervals and verdicts from them (no study folder, no torch) and names the first cell
    that differs from the exported tables. The same difference shows the same interval everywhere it is printed."""
    import shutil

    assert evaluated.exported.exit_code == 0, evaluated.exported.output[-3000:]
    results = evaluated.tmp / "results"
    for name in ("per_image.csv.gz", "evaluation_per_image.csv.gz", "verdict_settings.json", "verdicts.csv",
                 "pairwise.csv", "margins.csv", "ledger.csv"):
        assert name in json.loads((results / "export.json").read_text())["files"], name
    per_image = pd.read_csv(results / "per_image.csv.gz")
    assert sorted(per_image.groupby(["method", "seed"]).size().to_dict()) == [("init", 0), ("merge", 0)]
    assert per_image["image_id"].nunique() == 20 and "CIDEr-D" in per_image
    settings = json.loads((results / "verdict_settings.json").read_text())
    assert (settings["n_boot"], settings["seed"], settings["level"], settings["margin"]) == (2000, 0, 0.95, 5.0)
    # The confirm stage fixed the comparator from the search's validation scores (merge: the only competitor).
    assert list(settings["sets"]) == ["shapes test (the study's)", "shapes-b"] and settings["comparator"] == "merge"

    # One interval per difference: each set's verdict row, its pairwise row and its pooled row agree to the digit.
    verdicts = pd.read_csv(results / "verdicts.csv").set_index("set")
    pairwise = pd.read_csv(results / "pairwise.csv").set_index(["set", "method"])
    pooled = pd.read_csv(results / "pooled_verdict.csv").set_index("set")
    for name in settings["sets"]:
        assert verdicts.loc[name, "comparator"] == "merge"
        for frame in (pairwise.loc[(name, "merge")], pooled.loc[name]):
            assert (frame["diff"], frame["lo"], frame["hi"]) == tuple(verdicts.loc[name, ["diff", "lo", "hi"]])
    report = (evaluated.folder / "report" / "report.md").read_text()
    test = verdicts.loc["shapes test (the study's)"]
    shown = f"[{test['lo']:.1f}, {test['hi']:.1f}]"  # the export holds points, the report prints them to one decimal
    assert f"Difference init - merge (CIDEr-D): {test['diff']:.1f} {shown}" in report
    assert f"| shapes test (the study's) | 20 | 1 | {test['diff']:.1f} | {shown} |" in report
    margins = pd.read_csv(results / "margins.csv")
    assert list(margins[margins["set"] == "pooled"]["margin"])[:3] == [1.0, 2.0, 3.0]
    assert "The verdict at other equivalence margins" in report and "## Earlier looks at these test splits" in report

    # Recomputed from the export alone, in a process that never imports torch.
    code = ("import sys; from study.records.statistics import verify; r = verify(sys.argv[1]); "
            "print(r.ok, r.checked, 'torch' in sys.modules)")
    alone = subprocess.run([sys.executable, "-c", code, str(results)], capture_output=True, text=True, timeout=300)
    ok, checked, torch_loaded = alone.stdout.split()
    assert (ok, torch_loaded) == ("True", "False") and int(checked) > 50, alone.stdout + alone.stderr
    verified = _cli("verify", results)
    assert verified.exit_code == 0 and "verified: all" in verified.output, verified.output

    # One number edited in verdict.csv: verify fails and names the cell.
    edited = tmp_path / "edited"
    shutil.copytree(results, edited)
    table = pd.read_csv(edited / "verdict.csv")
    table.loc[table["method"] == "init", "CIDEr-D_lo"] += 0.1
    table.to_csv(edited / "verdict.csv", index=False)
    failed = _cli("verify", edited)
    assert failed.exit_code == 1, failed.output
    assert "MISMATCH: verdict.csv, row method init, column CIDEr-D_lo" in " ".join(failed.output.split())
    # An export from before per-image scores (the committed results/flickr8k_tokens) is named as such, not a crash.
    old = _cli("verify", REPO / "results" / "flickr8k_tokens")
    assert old.exit_code == 2 and "predates per-image scores" in " ".join(old.output.split())

    # The test-split ledger beside the studies: one row per set, however often the report ran; the export has them.
    ledger = pd.read_csv(evaluated.tmp / "runs" / "ledger.csv")
    assert sorted(ledger["set"]) == ["shapes test (the study's)", "shapes-b"] and set(ledger["study"]) == {"crossdata"}
    # the ledger is a record: one format, the 0..1 scale it began on, beside the studies and in the export alike
    assert (100 * ledger.set_index("set")["diff"] == verdicts["diff"].drop("pooled")).all()
    assert pd.read_csv(results / "ledger.csv").equals(ledger)


def test_report_never_prepares_the_data(evaluated, feature_cache_dir):
    """`study report` reads what the confirm stage recorded of the data (test_split.json: provenance and gallery)
    instead of preparing it: with the feature cache (and the generated dataset in it) moved away, the report is
    written whole and nothing is put back in the cache."""
    record = json.loads((evaluated.folder / "test_split.json").read_text())
    assert record["info"]["dataset_fingerprint"] and len(record["gallery"]) == 6
    moved = feature_cache_dir.with_name(feature_cache_dir.name + "-moved")
    feature_cache_dir.rename(moved)
    try:
        report = _study("report", str(evaluated.folder), cwd=evaluated.tmp)
        assert report.returncode == 0, report.stderr[-3000:]
        assert not feature_cache_dir.exists()  # no dataset generated, no feature extracted
    finally:
        if feature_cache_dir.exists():
            shutil.rmtree(feature_cache_dir)
        moved.rename(feature_cache_dir)
    text = (evaluated.folder / "report" / "report.md").read_text()
    assert record["info"]["dataset_fingerprint"] in text and "gallery.png" in text


@pytest.mark.slow
def test_the_study_facade_evaluates_and_rewrites_only_a_report_older_than_the_sets_results(evaluated):
    """`Study.evaluate` is the stage `study evaluate` runs: a report older than the set's results (as an evaluation
    run with `--no-report` leaves it) is rewritten; a second call leaves it alone."""
    import study

    s = study.load(evaluated.folder)
    report = evaluated.folder / "report" / "report.md"
    merge = evaluated.folder / "evaluate" / "shapes-b" / "runs" / "merge-r1-s0.json"
    older = merge.stat().st_mtime - 60
    os.utime(report, (older, older))
    outcome = s.evaluate(evaluated.other, split="train", name="shapes-b")
    assert outcome.computed == [] and sorted(outcome.reused) == ["init-r1-s0", "merge-r1-s0"]
    assert outcome.report == report and report.stat().st_mtime >= merge.stat().st_mtime
    assert "## Other photos: shapes-b" in report.read_text()
    stamp = report.stat().st_mtime_ns
    again = s.evaluate(evaluated.other, split="train", name="shapes-b")
    assert again.report is None and report.stat().st_mtime_ns == stamp
    assert again.verdict.verdict == outcome.verdict.verdict and again.verdict.diff == outcome.verdict.diff
