"""``study evaluate``: a finished study's confirm models scored on another dataset (``study.stages.evaluate``).
``study.cli.app`` adds the command to the ``study`` command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from study.config import ConfigError
from study.console import HELP_MARKUP, console, fail, out, wrapped

app = typer.Typer(rich_markup_mode=HELP_MARKUP)


@app.command()
def evaluate(
    study: str = typer.Argument(..., help="study name (under --storage) or its folder; it must have confirm runs"),
    dataset_json: Path = typer.Argument(..., metavar="DATASET.json", help="a Karpathy-format dataset JSON, e.g. "
                                        "../shared/data/coco-mini/dataset_coco_mini.json"),
    images_root: Optional[Path] = typer.Option(None, help="folder the JSON's image paths are relative to (default: "
                                               "the images/ folder beside the JSON)"),
    split: str = typer.Option("test", help="which split of the JSON to caption: train, val, test or restval"),
    name: Optional[str] = typer.Option(None, help="short name of the dataset in the report, the frames and MLflow "
                                       "(default: the JSON's `dataset` field, or its file name; -SPLIT added for a "
                                       "split other than test)"),
    storage: Optional[Path] = typer.Option(None, help="storage folder the study was run with (default ./runs)"),
    report: bool = typer.Option(True, help="rewrite the study's report afterwards, with a section for the dataset"),
    device: Optional[str] = typer.Option(None, help="torch device for features and decoding (default: CUDA if "
                                         "present, else CPU)"),
) -> None:
    """Does the answer hold on other photos? Every confirm run's trained model captions DATASET.json's images
    with the study's beam settings; the captions are scored with the full coco-caption suite against the
    dataset's raw references (words the model never saw count), and the verdict is computed on that set too,
    then pooled with the study's test split.

    Writes `<study>/evaluate/NAME/` (`set.json`, `runs/<run>.json` with per-image scores and captions,
    `verdict.csv`), adds the scores to MLflow's confirm runs as `NAME/<metric>`, and rewrites the report
    (a section per evaluated dataset and the pooled verdict). Features go through the feature cache. A second
    run of the same dataset reuses every finished result (resumable: each run is written as it is scored) and
    leaves a report that has the dataset's section as it is.
    Read the results with `study.load(STUDY).evaluations()`, `.evaluation_verdict(NAME)`, `.pooled_verdict()`;
    `study export` carries them."""
    from study.cli.study_commands import lock_study, open_study
    from study.data.features import ImageReadError
    from study.stages.evaluate import EvaluateError
    from study.trial.checkpoints import CheckpointError
    found = open_study(study, storage)
    with lock_study(found, f"study evaluate {found.name}"):
        try:
            outcome = found.evaluate(dataset_json, images_root=images_root, split=split, name=name, device=device,
                                     report=report)
        except (EvaluateError, CheckpointError, ImageReadError, ConfigError, ValueError) as exc:
            fail(str(exc))
        except KeyboardInterrupt:  # Ctrl-C: what was scored is kept (each run is written as it finishes)
            console.print(f"[yellow]evaluation interrupted.[/] Finished runs are kept; continue with:  "
                          f"{found.command('evaluate')} {dataset_json}" + (f" --split {split}" if split != "test"
                                                                            else "")
                          + (f" --name {name}" if name else ""), highlight=False)
            raise typer.Exit(130) from None
        _print_outcome(found, outcome)
        if outcome.report is not None:
            pooled = found.pooled_verdict().attrs
            out.print(wrapped(f"pooled over every test set: {pooled['verdict']}\n{pooled['text']}") +
                      f"\nreport: {outcome.report}", highlight=False)


def _print_outcome(found, outcome) -> None:
    """What was scored, the floor's warnings (a model that says nothing about these photos) and the set's verdict."""
    from study.trial.floor import evaluation_warnings, trained_on

    verdict = outcome.verdict
    out.print(f"evaluated study {found.name} on {outcome.name}: {len(outcome.computed)} runs scored, "
              f"{len(outcome.reused)} finished ones reused ({outcome.folder})", highlight=False)
    warnings = evaluation_warnings(outcome.folder, outcome.name, trained=trained_on(found.spec.dataset),
                                   metric=verdict.metric, roles=found.spec.arm_set.roles())
    for warning in warnings:
        console.print(wrapped(f"warning: {warning}"), highlight=False, markup=False)
    caveat = " (but the models score at the image-blind floor there or write nothing: see the warning)"
    out.print(wrapped(f"verdict on {outcome.name}: {verdict.verdict}{caveat if warnings else ''}\n{verdict.text}"),
              highlight=False)
