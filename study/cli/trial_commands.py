"""The ``study`` commands that work on one configuration, without Ray: generate the `shapes` data, extract
features, train one trial, caption image files. ``study.cli.app`` adds them to the ``study`` command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from study.config import ConfigError, TrialConfig
from study.console import HELP_MARKUP, console, fail, out, writable_folder

app = typer.Typer(rich_markup_mode=HELP_MARKUP)
data_app = typer.Typer(help="Generate or inspect datasets.", no_args_is_help=True, rich_markup_mode=HELP_MARKUP)
app.add_typer(data_app, name="data")


# ----- data and features -------------------------------------------------------------------------------
@data_app.command("shapes")
def data_shapes(
    out_dir: Path = typer.Option(..., "--out", help="folder to write dataset.json and images/ into"),
    seed: int = typer.Option(0, help="generator seed (same seed and options give byte-identical files)"),
    images: int = typer.Option(1000, min=1, help="number of images (split 80/10/10 into train/val/test)"),
    image_size: int = typer.Option(128, min=32, max=512, help="side of the rendered images in pixels (as the "
                                   "spec's dataset.image_size allows)"),
) -> None:
    """Generate the embedded `shapes` dataset (rendered scenes, 5 grammar captions each)."""
    from study.data.shapes import generate_shapes

    try:
        path = generate_shapes(out_dir, images=images, seed=seed, image_size=image_size)
    except (ValueError, OSError) as exc:
        fail(f"cannot write the shapes dataset to {out_dir}: {exc}")
    out.print(f"wrote {path} ({images} images)")


@app.command()
def features(
    dataset_json: Path = typer.Argument(..., help="a Karpathy-split dataset JSON (e.g. dataset_flickr8k.json)"),
    images_root: Optional[Path] = typer.Option(None, help="folder of the images (default: `<json folder>/images`, "
                                                           "or the JSON's folder when it holds images/ paths)"),
    encoder: str = typer.Option("efficientnet_lite0", help="image encoder registry name"),
    cache_dir: Optional[Path] = typer.Option(None, help="cache folder (default: $CAPTION_STUDY_CACHE or "
                                                         "~/.cache/caption-study)"),
    batch_size: int = typer.Option(32, help="images per CNN batch"),
    skip_bad: bool = typer.Option(False, help="skip (and count) missing or corrupt images instead of stopping"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda when present)"),
) -> None:
    """Extract the image features of a dataset once, or reuse the cache; say where it is and how big."""
    from study.config import default_cache_dir
    from study.data.features import ImageReadError, extract_features
    from study.data.karpathy import DatasetError, load_karpathy
    from study.data.prepare import feature_items

    try:
        root = images_root
        if root is None:
            root = dataset_json.parent / "images"
            if not root.is_dir():
                root = dataset_json.parent
        data = load_karpathy(dataset_json, root, on_error="skip" if skip_bad else "error")
        cache = extract_features(feature_items(data), encoder=encoder, cache_dir=cache_dir or default_cache_dir(),
                                 fingerprint=data.fingerprint(), batch_size=batch_size, device=device,
                                 on_error="skip" if skip_bad else "error")
    except (DatasetError, ImageReadError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    state = "reused" if cache.reused else "computed"
    out.print(f"features {state}: {cache.path}")
    out.print(f"  {len(cache.keys)} images, pooled {tuple(cache.pooled.shape)}, grid {tuple(cache.grid.shape)}, "
              f"{cache.nbytes / 2**20:.1f} MiB, encoder {cache.encoder}")
    skipped = len(data.skipped) + len(cache.failed)
    if skipped:
        out.print(f"  skipped {skipped} images (missing or corrupt)")


# ----- one trial ---------------------------------------------------------------------------------------
def _epoch_table(history: list[dict]) -> Table:
    from analysis.metric_table import format_metric

    metrics = ("train_loss", "val_loss", "val_bpc", "val_CIDEr-D", "val_BLEU-4")
    table = Table(title="epochs", show_lines=False)
    for col in ("epoch", *metrics, "sec"):
        table.add_column(col, justify="right")
    for m in history:
        table.add_row(str(m["epoch"]), *(format_metric(k, m[k]) for k in metrics), f"{m['epoch_seconds']:.1f}")
    return table


TRAIN_RUNS = Path("runs/train")  # where `study train` makes a new folder per run when --out is not given
RUN_FILES = ("checkpoint.pt", "metrics.json")  # what marks a folder as holding a run


def _effective_config(cfg: TrialConfig, source: Path) -> str:
    """Every field of a trial config in two compact lines, and which ones the file set: an empty YAML trains
    the defaults, and the user should see what is trained before the first epoch, not after."""
    values = cfg.model_dump(mode="json", by_alias=True)
    dataset = values.pop("dataset")
    given = sorted(cfg.model_fields_set)
    origin = (f"{source} (or an option) sets {', '.join(given)}; the rest are defaults" if given
              else f"{source} sets no key: every value is a default")
    return (f"config: {' '.join(f'{k}={v}' for k, v in values.items())}\n"
            f"dataset: {' '.join(f'{k}={v}' for k, v in dataset.items())}\n{origin}")


def _new_run_folder(parent: Path, name: str) -> Path:
    """Create ``parent/<name>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``... when runs start in the same second).
    Created, not just named, so two runs started at once never share a folder."""
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        folder = parent / (f"{name}-{stamp}" if n == 1 else f"{name}-{stamp}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent}: 999 runs named {name}-{stamp} exist")


def _train_out_dir(out_dir: Optional[Path], run_name: str, *, overwrite: bool, resume: bool) -> Path:
    """The folder a `study train` run writes to: a new one per run by default; an explicit --out holding a
    run is refused unless --overwrite (replace it) or --resume (continue it). Checked writable up front."""
    if overwrite and resume:
        fail("--overwrite and --resume contradict each other: --resume continues the run in --out, "
              "--overwrite replaces it")
    if out_dir is None and (overwrite or resume):
        fail(f"--{'resume' if resume else 'overwrite'} needs --out: the folder of the run to "
              f"{'continue' if resume else 'replace'}")
    if out_dir is None:
        writable_folder(TRAIN_RUNS)
        return _new_run_folder(TRAIN_RUNS, run_name)
    held = [name for name in RUN_FILES if (out_dir / name).exists()]
    if resume and not (out_dir / "checkpoint.pt").is_file():
        fail(f"nothing to resume: {out_dir} holds no checkpoint.pt")
    if held and not (resume or overwrite):
        fail(f"{out_dir} already holds a run ({', '.join(held)}); not overwriting it. Pass --overwrite to "
              "replace it, --resume to continue it, or leave out --out to train into a new folder under "
              f"{TRAIN_RUNS}")
    writable_folder(out_dir)
    return out_dir


@app.command()
def train(
    config: Path = typer.Argument(..., help="trial YAML: cell, layers, hidden, tokens, inject, epochs, dataset..."),
    out_dir: Optional[Path] = typer.Option(
        None, "--out", help=f"writes metrics.json and checkpoint.pt here (default: a new folder "
                            f"`{TRAIN_RUNS}/<run name>-<date>-<time>`); a folder holding a run is refused unless "
                            "--overwrite or --resume"),
    epochs: Optional[int] = typer.Option(None, help="override the config's epochs (at least 1)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: cuda when present)"),
    test: bool = typer.Option(True, help="score the test split with beam search and the full metric suite"),
    resume: bool = typer.Option(False, help="continue from the checkpoint in --out"),
    overwrite: bool = typer.Option(False, help="replace the run already in --out"),
) -> None:
    """Train one configuration without Ray (the same loop the Tune trainable runs)."""
    from study.config import load_trial_config
    from study.trial.checkpoints import CheckpointError, copy_checkpoint
    from study.trial.training import TrialDiverged, run_trial, write_metrics

    if epochs is not None and epochs < 1:  # `--epochs 0` was once ignored; it would train nothing
        fail(f"--epochs must be at least 1, got {epochs}")
    try:
        cfg = load_trial_config(config, {"epochs": epochs} if epochs is not None else None)
    except ConfigError as exc:
        fail(str(exc))
    console.print(f"[bold]{cfg.run_name}[/] for {cfg.epochs} epochs on {cfg.dataset.kind}")
    console.print(_effective_config(cfg, config), highlight=False)
    fresh = out_dir is None
    out_dir = _train_out_dir(out_dir, cfg.run_name, overwrite=overwrite, resume=resume)
    console.print(f"output: {out_dir}", highlight=False)
    data = _train_data(cfg, out_dir, remove_if_failed=fresh, device=device)
    if overwrite:  # only once the data is ready: a run that fails before training keeps the old one
        for name in RUN_FILES:
            (out_dir / name).unlink(missing_ok=True)
    resume_from = out_dir if resume else None

    def epoch_end(metrics: dict, checkpoint_dir: Path) -> None:
        copy_checkpoint(checkpoint_dir.parent, out_dir)
        _print_epoch(metrics)

    try:
        result = run_trial(cfg, data, work_dir=out_dir / ".work", on_epoch=epoch_end, resume_from=resume_from,
                           device=device, final_test=test)
    except (CheckpointError, TrialDiverged) as exc:
        fail(str(exc))
    _print_result(result, write_metrics(result, out_dir), out_dir)


def _print_result(result, metrics_path: Path, out_dir: Path) -> None:
    """The epochs' table, the test scores (when the test split was scored) and where the run's files are."""
    from analysis.metric_table import format_metric

    console.print(_epoch_table(result.epochs))
    if "final" in result.record:
        final = result.record["final"]
        console.print(f"test (beam {final['beam_size']}): " + "  ".join(
            f"{k} {format_metric(k, v)}" for k, v in final.items() if isinstance(v, float)), highlight=False)
    out.print(f"metrics: {metrics_path}\ncheckpoint: {out_dir / 'checkpoint.pt'}")


def _train_data(cfg, out_dir: Path, *, remove_if_failed: bool, device: str | None):
    """The trial's prepared data (features cached), or a clear failure that leaves no empty run folder."""
    from study.data.features import ImageReadError
    from study.data.karpathy import DatasetError
    from study.data.prepare import TokenSetting, prepare
    from study.registry import METHODS

    try:
        return prepare(cfg.dataset, [TokenSetting.of(cfg)], need_grid=METHODS[cfg.inject].needs_grid, device=device)
    except (DatasetError, ImageReadError, FileNotFoundError, ValueError) as exc:
        if remove_if_failed:
            out_dir.rmdir()  # nothing was written yet
        fail(str(exc))


def _print_epoch(metrics: dict) -> None:
    """One line per epoch of `study train`: losses, bits per char, the validation metrics, seconds."""
    from analysis.metric_table import format_metric

    shown = ("train_loss", "val_loss", "val_bpc", "val_CIDEr-D", "val_BLEU-4")
    console.print(f"epoch {metrics['epoch']:>3}: " + "  ".join(
        f"{k.removeprefix('val_')} {format_metric(k, metrics[k])}" for k in shown)
        + f"  ({metrics['epoch_seconds']:.1f} s)", highlight=False)


@app.command()
def caption(
    images: list[Path] = typer.Argument(..., help="image files to caption"),
    checkpoint: Path = typer.Option(..., help="checkpoint.pt written by `study train` or a study trial"),
    beam_size: int = typer.Option(3, min=1, help="1 = greedy"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: cuda when present)"),
) -> None:
    """Caption real image files with a trained checkpoint."""
    from study.config import checkpoint_config
    from study.trial.checkpoints import load_checkpoint
    from study.trial.floor import caption_warnings, trained_on
    from study.trial.inference import caption_files

    captions = []
    try:
        for path, text in caption_files(checkpoint, images, beam_size=beam_size, device=device):
            typer.echo(f"{path}\t{text}")  # tab-separated, for scripts
            captions.append(text)
        trained = trained_on(checkpoint_config(load_checkpoint(checkpoint)["config"], str(checkpoint)).dataset)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    for warning in caption_warnings(captions, trained_on=trained):  # on stderr: stdout stays one line per image
        console.print(f"warning: {warning}", highlight=False, markup=False)


@app.command()
def reproduce(
    export_dir: Path = typer.Argument(..., metavar="EXPORT_DIR", help="a `study export` folder, e.g. results/flickr8k"),
    run: str = typer.Argument(..., metavar="RUN", help="a confirm run of its confirm_runs.csv, e.g. init-r1-s0"),
    dataset_root: Optional[Path] = typer.Option(
        None, help="the folder the spec's relative dataset paths start from (default: the spec's folder that "
        "`study export` recorded, found in the repository holding EXPORT_DIR, e.g. search_spaces/; else EXPORT_DIR)"),
    keep: Optional[Path] = typer.Option(None, "--keep", metavar="DIR", help="keep the retrained checkpoint as "
                                        "DIR/RUN.pt, to caption photos with `study caption --checkpoint DIR/RUN.pt`"),
) -> None:
    """Retrain one confirm run of an exported study from what the export holds (spec, configuration, seed) and
    print each test metric beside the committed one with the difference. Refuses, naming both fingerprints, when
    the data is not the data the study ran on."""
    from study.stages.reproduce import reproduce as retrain

    try:
        done = retrain(export_dir, run, dataset_root=dataset_root, keep=keep)
    except ConfigError as exc:
        fail(str(exc))
    table = Table(title=f"{run}: {done.config.run_name}, torch seed {done.config.seed}, {done.config.epochs} epochs, "
                        f"beam {done.config.beam_size}, {done.config.precision} (points)")
    for column in ("metric", "committed", "reproduced", "difference"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for metric, committed, reproduced, diff in done.rows():
        table.add_row(metric, f"{committed:.2f}", f"{reproduced:.2f}", f"{diff:+.4f}")
    out.print(table)
    out.print("reproduced exactly: every metric equals the committed one" if done.exact else
              "not exact: the differences above (other hardware, library versions or precision can move them)")
    if done.checkpoint is not None:
        out.print(f"checkpoint kept: {done.checkpoint}  (study caption PHOTO.jpg --checkpoint {done.checkpoint})",
                  highlight=False, soft_wrap=True)
