"""The records layer's typed records (issue 30): what one stage writes and another reads, read back the same way by
every reader, old records included, and a damaged one refused naming its file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from study.records import ExportManifest, read_export_manifest, write_export_manifest
from study.records.decide_log import DecideLog, Look, read_decide_log, report_level, write_decide_log
from study.records.paths import StudyPaths
from study.records.run_results import (
    ConfirmResult,
    RecordError,
    confirm_history,
    load_confirm,
    read_confirm_result,
    write_confirm_result,
)


def _result(**fields) -> dict:
    """A confirm result as the confirm stage writes it: 2 test images, 2 epochs, the best at epoch 1."""
    return {"method": "init", "config_rank": 1, "seed": 0, "config": {"inject": "init", "seed": 1000, "epochs": 2},
            "scores": {"CIDEr-D": 0.5, "BLEU-4": 0.25, "METEOR": float("nan")},
            "captions": ["a dog runs", "a dog runs"],
            "per_image": {"CIDEr-D": {"0": 0.4, "1": 0.6}, "BLEU-4": {"0": 0.2, "1": 0.3}},
            "params": 1234, "epochs": 2, "train_seconds": 3.5, "seconds": 9.0,
            "history": [{"epoch": 1, "val_CIDEr-D": 0.3}, {"epoch": 2, "val_CIDEr-D": 0.2}],
            "selection": {"chosen_epoch": 1, "rule": "best val_CIDEr-D", "stopped": "schedule end"},
            "started_ms": 1_000, "ended_ms": 10_000, **fields}


@pytest.fixture
def paths(tmp_path) -> StudyPaths:
    found = StudyPaths.at(tmp_path / "study")
    found.confirm.mkdir(parents=True)
    return found


def test_a_confirm_result_reads_back_as_written_and_feeds_the_frames(paths):
    write_confirm_result(paths, "init-r1-s0", ConfirmResult(**_result(newer_field="kept")))
    result = read_confirm_result(paths.confirm_result("init-r1-s0"))
    assert result.chosen.chosen_epoch == 1 and result.chosen.rule == "best val_CIDEr-D"
    assert result.model_extra == {"newer_field": "kept"}  # a field a newer version wrote survives a rewrite
    assert math.isnan(result.scores["METEOR"])  # NaN stays NaN in the file (METEOR without Java)
    per_image, runs, gallery = load_confirm(paths)
    assert per_image[["image_id", "CIDEr-D", "BLEU-4"]].values.tolist() == [[0, 0.4, 0.2], [1, 0.6, 0.3]]
    assert per_image["METEOR"].isna().all()  # no per-image METEOR: NaN, not a missing column
    row = runs.iloc[0]
    assert (row["chosen_epoch"], row["test_images"], row["distinct_captions"], row["CIDEr-D"]) == (1, 2, 1, 0.5)
    assert gallery.empty  # without the test split's record there is nothing to show
    history = confirm_history(paths)
    assert history["chosen"].tolist() == [True, False] and set(history["run"]) == {"init-r1-s0"}


def test_a_confirm_result_from_before_the_selection_rule_was_scored_at_its_last_epoch(paths):
    old = _result()
    for key in ("selection", "seconds", "history", "started_ms", "ended_ms"):
        del old[key]
    paths.confirm_result("init-r1-s0").write_text(json.dumps(old))
    result = read_confirm_result(paths.confirm_result("init-r1-s0"))
    assert (result.chosen.chosen_epoch, result.chosen.rule, result.chosen.stopped) == (2, "last", "schedule end")
    runs = load_confirm(paths)[1]
    assert runs.loc[0, "chosen_epoch"] == 2 and math.isnan(runs.loc[0, "seconds"])


@pytest.mark.parametrize("damage, needle", [
    (lambda text: text[: len(text) // 2], "line 1 column"),  # torn by a full disk: where the JSON breaks off
    (lambda text: text.replace('"captions"', '"caption"'), "captions"),  # a field renamed by hand: the field named
])
def test_a_damaged_confirm_result_is_refused_naming_the_file_the_fault_and_the_remedy(paths, damage, needle):
    path = paths.confirm_result("init-r1-s0")
    path.write_text(damage(json.dumps(_result())))
    with pytest.raises(RecordError) as caught:
        load_confirm(paths)
    said = str(caught.value)
    assert said.startswith(f"{path} is not a readable ConfirmResult (") and needle in said
    assert said.endswith("move it aside and `study confirm` trains that run again")


def test_the_decide_log_fixes_the_reports_level_and_round_trips(paths, small_shapes):
    from study.spec import load_spec
    from tests.helpers import study_spec

    spec = load_spec(study_spec(paths.root.parent, "s", small_shapes))  # 2 confirm seeds, no plan of its own
    assert read_decide_log(paths) is None and report_level(spec, paths) == 0.95  # no plan: the fixed design
    look = Look(seeds={"init": 2, "pre": 2}, best_other="pre", diff=-0.01, ci=(-0.03, 0.01), level=0.9875,
                verdict="inconclusive")
    write_decide_log(paths, DecideLog(max_seeds=3, plan="sequential plan: up to 3 seeds", looks=[look]))
    assert read_decide_log(paths).looks == [look]
    # The plan the log fixed: looks at 2 and 3 seeds, each at 1 - 0.05 / 2 (Bonferroni).
    assert report_level(spec, paths) == pytest.approx(0.975)
    paths.decide.write_text('{"max_seeds": "many"}')
    with pytest.raises(RecordError, match=f"{paths.decide} is not a readable decide log"):
        report_level(spec, paths)


def test_an_export_manifest_says_its_scale_and_an_export_from_before_manifests_reads_empty(tmp_path):
    assert read_export_manifest(tmp_path) == ExportManifest() and not ExportManifest().in_points
    write_export_manifest(tmp_path, ExportManifest(study="s", files=["a.csv"], spec_folder="search_spaces",
                                                   scores="points"))
    assert json.loads((tmp_path / "export.json").read_text()) == {
        "study": "s", "files": ["a.csv"], "spec_folder": "search_spaces", "scores": "points"}
    assert read_export_manifest(Path(tmp_path)).in_points
