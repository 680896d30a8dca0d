"""What a user sees when `study` gets a bad input: one sentence naming what and where (exit 2, `error: ...`),
never a traceback; runs are never overwritten; a checkpoint captions without its training data.

Real commands (typer's CliRunner, in process), real files, real tiny trainings (hidden 16, 1 epoch) on the
session's small `shapes` data.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from study.config import ConfigError, TrialConfig
from tests.helpers import shapes_dataset
from tests.helpers import study_in_process as _study

TINY = {"hidden": 16, "embed": 16, "dropout": 0.0, "epochs": 1, "min_count": 1, "batch_size": 40,
        "val_images": 10}


def _trial_yaml(path: Path, dataset: dict, **overrides) -> Path:
    path.write_text(yaml.safe_dump({"dataset": dataset, **TINY, **overrides}))
    return path


def _assert_sentence(result, *fragments: str) -> None:
    """Exit 2, `error:` on stderr with every fragment, and no traceback anywhere."""
    assert result.exit_code == 2, (result.exit_code, result.output[-3000:], result.exception)
    assert "error:" in result.stderr, result.output[-3000:]
    flat = " ".join(result.stderr.split())  # rich may break a long line; compare with single spaces
    for fragment in fragments:
        assert " ".join(fragment.split()) in flat, (fragment, result.stderr[-3000:])
    assert "Traceback" not in result.output


def _karpathy_copy(shapes_json: Path, dest: Path, *, per_split: dict[str, int]) -> Path:
    """A small Karpathy-format dataset in ``dest``: the first images of each split of a shapes dataset,
    copied (a dataset of its own, which the test may break, move or delete)."""
    data = json.loads(shapes_json.read_text())
    (dest / "images").mkdir(parents=True)
    entries = []
    for split, count in per_split.items():
        for entry in [e for e in data["images"] if e["split"] == split][:count]:
            shutil.copy(shapes_json.parent / "images" / entry["filename"], dest / "images" / entry["filename"])
            entries.append({k: entry[k] for k in ("filename", "split", "sentences")})
    path = dest / "dataset.json"
    path.write_text(json.dumps({"dataset": "shapes-copy", "images": entries}))
    return path


@pytest.fixture(scope="module")
def shapes_json(small_shapes, small_prepared) -> Path:
    """The small shapes dataset's JSON (generated, and its features cached, by small_prepared)."""
    return Path(small_prepared.info["dataset_json"])


# ----- item 3: a run is never overwritten --------------------------------------------------------------
def test_train_makes_a_new_folder_per_run_and_refuses_to_overwrite_one(small_shapes, small_prepared, tmp_path,
                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _trial_yaml(tmp_path / "tiny.yaml", shapes_dataset(small_shapes))
    run_name = TrialConfig.model_validate({**TINY, "dataset": small_shapes}).run_name

    first = _study("train", config, "--no-test")
    second = _study("train", config, "--no-test")
    assert first.exit_code == 0 and second.exit_code == 0, (first.output[-2000:], second.output[-2000:])
    folders = sorted((tmp_path / "runs" / "train").iterdir())
    assert len(folders) == 2
    for folder, result in zip(folders, (first, second)):
        assert re.fullmatch(rf"{re.escape(run_name)}-\d{{8}}-\d{{6}}(-\d+)?", folder.name), folder.name
        assert f"output: {Path('runs/train') / folder.name}" in result.stderr  # said at the start
        assert (folder / "checkpoint.pt").is_file() and (folder / "metrics.json").is_file()
    # The effective config is printed in full, every field, before training.
    printed = first.stderr[:first.stderr.index("output:")]
    for field in TrialConfig.model_fields:
        if field != "dataset":
            assert f" {field}=" in printed, field
    assert "dataset: kind=shapes images=200" in printed

    kept = folders[0] / "checkpoint.pt"
    before = kept.read_bytes()
    refused = _study("train", config, "--no-test", "--out", folders[0])
    _assert_sentence(refused, f"{folders[0]} already holds a run", "--overwrite", "--resume")
    assert kept.read_bytes() == before

    replaced = _study("train", config, "--no-test", "--out", folders[0], "--overwrite", "--epochs", "2")
    assert replaced.exit_code == 0, replaced.output[-2000:]
    assert torch.load(kept, weights_only=True)["epoch"] == 2


def test_empty_trial_yaml_says_it_trains_every_default(tmp_path, monkeypatch):
    """An empty YAML is legal (all defaults) but must not pass silently: the effective config comes first."""
    import study.data.prepare
    from study.data.karpathy import DatasetError

    def stop(*args, **kwargs):  # the defaults' 1000-image dataset is not the point here: stop at data
        raise DatasetError("stopped by the test after the config was printed")

    monkeypatch.setattr(study.data.prepare, "prepare", stop)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.yaml").write_text("")
    result = _study("train", "empty.yaml")
    _assert_sentence(result, "stopped by the test")
    defaults = TrialConfig()
    assert f"config: inject={defaults.inject} cell={defaults.cell} layers={defaults.layers} " \
           f"hidden={defaults.hidden}" in result.stderr
    assert "empty.yaml sets no key: every value is a default" in result.stderr
    assert list((tmp_path / "runs" / "train").iterdir()) == []  # no empty run folder left behind


# ----- item 7: a checkpoint is self-contained -------------------------------------------------------------
def test_checkpoint_captions_after_its_dataset_is_deleted(shapes_json, tmp_path):
    dataset = _karpathy_copy(shapes_json, tmp_path / "data", per_split={"train": 24, "val": 3, "test": 3})
    config = _trial_yaml(tmp_path / "karpathy.yaml", {"kind": "karpathy", "json": str(dataset),
                                                     "cache_dir": str(tmp_path / "cache")})
    trained = _study("train", config, "--no-test", "--out", tmp_path / "model")
    assert trained.exit_code == 0, trained.output[-3000:]

    images = sorted((tmp_path / "data" / "images").iterdir())[:2]
    kept = [Path(shutil.copy(p, tmp_path / p.name)) for p in images]
    shutil.rmtree(tmp_path / "data")  # the training JSON and images are gone
    shutil.rmtree(tmp_path / "cache")  # and so is their feature cache
    result = _study("caption", "--checkpoint", tmp_path / "model" / "checkpoint.pt", "--beam-size", "2", *kept)
    assert result.exit_code == 0, result.output[-3000:]
    lines = result.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in kept]
    assert all(line.split("\t")[1].strip() for line in lines)

    state = torch.load(tmp_path / "model" / "checkpoint.pt", weights_only=True)
    assert state["encoder"]["name"] == "efficientnet_lite0"
    assert state["encoder"]["preprocessing"]["image_size"] == 224 and state["feature_dim"] > 0


# ----- items 8 and 9: a sentence, not a traceback --------------------------------------------------------
def _binary_config(tmp: Path, shapes, shapes_json: Path) -> tuple[list, list[str]]:
    path = tmp / "model.yaml"
    path.write_bytes(b"\x80\x04\x95" + bytes(range(256)))  # e.g. a checkpoint passed as the config
    return ["train", path], [f"{path}: not a YAML text file"]


def _bad_image(tmp: Path, shapes, shapes_json: Path) -> tuple[list, list[str]]:
    dataset = _karpathy_copy(shapes_json, tmp / "data", per_split={"train": 6, "val": 2, "test": 2})
    broken = sorted((tmp / "data" / "images").iterdir())[0]
    broken.write_bytes(b"not an image at all")
    config = _trial_yaml(tmp / "t.yaml", {"kind": "karpathy", "json": str(dataset), "cache_dir": str(tmp / "c")})
    return ["train", config, "--out", tmp / "out"], ["cannot read image", str(broken)]


def _unknown_split(tmp: Path, shapes, shapes_json: Path) -> tuple[list, list[str]]:
    dataset = _karpathy_copy(shapes_json, tmp / "data", per_split={"train": 6, "val": 2, "test": 2})
    data = json.loads(dataset.read_text())
    data["images"][0]["split"] = "trian"
    dataset.write_text(json.dumps(data))
    config = _trial_yaml(tmp / "t.yaml", {"kind": "karpathy", "json": str(dataset), "cache_dir": str(tmp / "c")})
    return ["train", config, "--out", tmp / "out"], [f"{dataset}: images[0]", "unknown split 'trian'"]


def _empty_split(tmp: Path, shapes, shapes_json: Path) -> tuple[list, list[str]]:
    dataset = _karpathy_copy(shapes_json, tmp / "data", per_split={"train": 6, "test": 2})
    config = _trial_yaml(tmp / "t.yaml", {"kind": "karpathy", "json": str(dataset), "cache_dir": str(tmp / "c")})
    return ["train", config, "--out", tmp / "out"], [f"{dataset}: the 'val' split has no usable images"]


def _pickled_object(tmp: Path, shapes, shapes_json: Path) -> tuple[list, list[str]]:
    path = tmp / "model.pt"
    torch.save({"when": datetime.datetime(2024, 1, 1)}, path)  # a pickle of a class: refused by weights_only
    return ["caption", "--checkpoint", path, path], [f"{path} is not a caption-study checkpoint"]


def _random_bytes(tmp: Path, shapes, shapes_json: Path) -> tuple[list, list[str]]:
    path = tmp / "model.pt"
    path.write_bytes(b"\x00garbage" * 50)
    return ["caption", "--checkpoint", path, path], [f"{path} is not a caption-study checkpoint"]


def _empty_file(tmp: Path, shapes, shapes_json: Path) -> tuple[list, list[str]]:
    path = tmp / "model.pt"
    path.write_bytes(b"")
    return ["caption", "--checkpoint", path, path], [f"{path} is not a caption-study checkpoint"]


def _a_tensor(tmp: Path, shapes, shapes_json: Path) -> tuple[list, list[str]]:
    path = tmp / "model.pt"
    torch.save(torch.zeros(3), path)
    return ["caption", "--checkpoint", path, path], [f"{path} is not a caption-study checkpoint",
                                                    "holds a Tensor"]


def _no_config(tmp: Path, shapes, shapes_json: Path) -> tuple[list, list[str]]:
    path = tmp / "model.pt"
    torch.save({"model": {}, "vocab": {}, "feature_dim": 8}, path)
    return ["caption", "--checkpoint", path, path], [f"{path} is not a caption-study checkpoint",
                                                    "it lacks 'config'"]


def _unwritable_out(tmp: Path, shapes, shapes_json: Path) -> tuple[list, list[str]]:
    (tmp / "a-file").write_text("a file where the output folder should go")
    config = _trial_yaml(tmp / "t.yaml", shapes_dataset(shapes))
    return ["train", config, "--out", tmp / "a-file" / "run"], [f"cannot write to {tmp / 'a-file' / 'run'}"]


def _unwritable_storage(tmp: Path, shapes, shapes_json: Path) -> tuple[list, list[str]]:
    (tmp / "a-file").write_text("a file where the storage folder should go")
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "ro", "dataset": shapes_dataset(shapes), "fixed": {"hidden": 16, "min_count": 1},
        "space": {"inject": {"choice": ["init", "merge"]}}, "stratify": "inject", "search": {"trials": 2},
        "asha": {"max_epochs": 1, "grace_period": 1}, "resources": {"cpu": 1}}))
    return ["run", spec, "--storage", tmp / "a-file"], [f"cannot write to {tmp / 'a-file' / 'ro'}"]


def _epochs_zero(tmp: Path, shapes, shapes_json: Path) -> tuple[list, list[str]]:
    config = _trial_yaml(tmp / "t.yaml", shapes_dataset(shapes))
    return ["train", config, "--epochs", "0", "--out", tmp / "out"], ["--epochs must be at least 1, got 0"]


def _format_xml(tmp: Path, shapes, shapes_json: Path) -> tuple[list, list[str]]:
    return ["leaderboard", "any", "--format", "xml"], ["--format 'xml'", "allowed: text, csv, markdown"]


def _metric_nope(tmp: Path, shapes, shapes_json: Path) -> tuple[list, list[str]]:
    return ["leaderboard", "any", "--metric", "nope"], ["--metric 'nope' is not a metric a trial reports",
                                                        "allowed: val_CIDEr-D, val_BLEU-4, val_loss"]


def _mode_maxx(tmp: Path, shapes, shapes_json: Path) -> tuple[list, list[str]]:
    return ["leaderboard", "any", "--mode", "maxx"], ["--mode 'maxx' is not a mode; allowed: max, min"]


def _corrupt_study_json(tmp: Path, shapes, shapes_json: Path) -> tuple[list, list[str]]:
    (tmp / "runs" / "broken").mkdir(parents=True)
    (tmp / "runs" / "broken" / "study.json").write_text('{"name": "broken", "spec": ')  # cut off mid-write
    return ["leaderboard", "broken", "--storage", tmp / "runs"], [f"{tmp / 'runs' / 'broken' / 'study.json'} "
                                                                  "is damaged"]


def _resources_beyond_the_machine(tmp: Path, shapes, shapes_json: Path) -> tuple[list, list[str]]:
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "big", "dataset": shapes_dataset(shapes), "fixed": {"hidden": 16, "min_count": 1},
        "space": {"inject": {"choice": ["init", "merge"]}}, "stratify": "inject", "search": {"trials": 2},
        "asha": {"max_epochs": 1, "grace_period": 1}, "resources": {"cpu": 1000}, "storage": str(tmp / "runs")}))
    return ["run", spec], ["each trial asks for 1000 CPUs and 0 GPUs, but this machine has", "no trial could start"]


def _min_count_beyond_every_word(tmp: Path, shapes, shapes_json: Path) -> tuple[list, list[str]]:
    config = _trial_yaml(tmp / "t.yaml", shapes_dataset(shapes), min_count=100000)
    return ["train", config, "--out", tmp / "out"], ["min_count 100000: no word of the train split occurs that often"]


CASES = {
    "binary config": _binary_config,
    "bad image": _bad_image,
    "unknown split": _unknown_split,
    "empty split": _empty_split,
    "pickled object as checkpoint": _pickled_object,
    "random bytes as checkpoint": _random_bytes,
    "empty checkpoint file": _empty_file,
    "tensor as checkpoint": _a_tensor,
    "checkpoint without config": _no_config,
    "unwritable --out": _unwritable_out,
    "unwritable storage": _unwritable_storage,
    "train --epochs 0": _epochs_zero,
    "leaderboard --format xml": _format_xml,
    "leaderboard --metric nope": _metric_nope,
    "leaderboard --mode maxx": _mode_maxx,
    "corrupt study.json": _corrupt_study_json,
    "resources beyond the machine": _resources_beyond_the_machine,
    "min_count beyond every word": _min_count_beyond_every_word,
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_is_one_sentence_naming_what_and_where(case, small_shapes, shapes_json, tmp_path):
    args, fragments = CASES[case](tmp_path, small_shapes, shapes_json)
    result = _study(*args)
    _assert_sentence(result, *fragments)
    if case == "resources beyond the machine":
        # Refused before the study was recorded: after fixing the YAML, `study run` starts it (no "exists").
        assert not (tmp_path / "runs" / "big" / "study.json").exists()
        _assert_sentence(_study(*args), *fragments)
    # Never advise loading a stranger's file with code execution enabled.
    assert "weights_only=False" not in result.output and "weights_only` set to `False" not in result.output


def test_resume_with_another_model_size_names_the_settings(small_shapes, small_prepared, tmp_path):
    out = tmp_path / "run"
    trained = _study("train", _trial_yaml(tmp_path / "a.yaml", shapes_dataset(small_shapes)), "--no-test",
                     "--out", out)
    assert trained.exit_code == 0, trained.output[-2000:]
    before = (out / "checkpoint.pt").read_bytes()
    wider = _trial_yaml(tmp_path / "b.yaml", shapes_dataset(small_shapes), hidden=24, epochs=2)
    result = _study("train", wider, "--no-test", "--out", out, "--resume")
    _assert_sentence(result, f"cannot resume from {out}", "the checkpoint was trained with hidden=16",
                     "this config has hidden=24")
    assert (out / "checkpoint.pt").read_bytes() == before
    # The same settings with more epochs continue the run after its first epoch.
    longer = _trial_yaml(tmp_path / "c.yaml", shapes_dataset(small_shapes), epochs=2)
    resumed = _study("train", longer, "--no-test", "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output[-2000:]
    assert [e["epoch"] for e in json.loads((out / "metrics.json").read_text())["epochs"]] == [1, 2]
    assert "epoch   1:" not in resumed.stderr and "epoch   2:" in resumed.stderr


@pytest.fixture(scope="module")
def died_in_preparation(shapes_json, tmp_path_factory) -> Path:
    """The storage folder of a real `study run` whose dataset has a corrupt image: it stopped in data preparation,
    after writing study.json and before Tune started."""
    tmp = tmp_path_factory.mktemp("died")
    dataset = _karpathy_copy(shapes_json, tmp / "data", per_split={"train": 6, "val": 2, "test": 2})
    sorted((tmp / "data" / "images").iterdir())[0].write_bytes(b"corrupt")
    spec = tmp / "died.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "died", "dataset": {"kind": "karpathy", "json": str(dataset), "cache_dir": str(tmp / "cache")},
        "fixed": {"hidden": 16, "min_count": 1}, "space": {"inject": {"choice": ["init", "merge"]}},
        "stratify": "inject", "search": {"trials": 2}, "asha": {"max_epochs": 1, "grace_period": 1},
        "resources": {"cpu": 1}, "storage": str(tmp / "runs")}))
    result = _study("run", spec)
    assert result.exit_code != 0 and (tmp / "runs" / "died" / "study.json").is_file(), result.output[-2000:]
    return tmp / "runs"


@pytest.mark.parametrize("command", ["leaderboard", "report"])
def test_study_that_died_in_data_preparation_says_so_and_how_to_resume(command, died_in_preparation):
    result = _study(command, "died", "--storage", died_in_preparation)
    _assert_sentence(result, "study 'died' has no trials yet", "no Tune state",
                     f"study resume {(died_in_preparation / 'died').resolve()}")


def test_a_dataset_changed_after_the_search_is_refused_naming_both_fingerprints(shapes_json, tmp_path):
    """Images moved from train to test after the search: `study report` re-extracted features and scored the
    confirm runs on the new test split, exit 0, no warning. Every stage now compares the data's fingerprint with
    the one the search journalled when it began (study_start), and refuses when they differ."""
    from study.spec import load_spec
    from study.study import Study
    from study.tracking import source_tags

    dataset = _karpathy_copy(shapes_json, tmp_path / "data", per_split={"train": 20, "val": 5, "test": 5})
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "moved", "dataset": {"kind": "karpathy", "json": str(dataset), "cache_dir": str(tmp_path / "c")},
        "fixed": {"min_count": 1}, "space": {"inject": {"choice": ["init", "merge"]}}, "stratify": "inject",
        "storage": str(tmp_path / "runs")}))
    study = Study.from_spec(load_spec(spec_path), spec_path)
    recorded = study.data(progress=False).info  # what the search prepared and journalled as it began
    study.tracker().start_study({}, {**source_tags("study run"),
                                     "dataset_fingerprint": recorded["dataset_fingerprint"]})
    assert Study.from_spec(study.spec, spec_path).data(progress=False).info["dataset_fingerprint"] == \
        recorded["dataset_fingerprint"]  # unchanged data: no complaint

    data = json.loads(dataset.read_text())
    for entry in [e for e in data["images"] if e["split"] == "train"][:5]:
        entry["split"] = "test"
    dataset.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="changed since study moved's search began: its fingerprint was "
                                          f"{recorded['dataset_fingerprint']}, it is [0-9a-f]+ now"):
        Study.from_spec(study.spec, spec_path).data(progress=False)
