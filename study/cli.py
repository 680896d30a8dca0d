"""The ``study`` command: prepare data, train one trial, run / resume a Ray Tune study, read the results.

Heavy imports (torch, ray, mlflow) happen inside the commands so ``study --help`` is instant.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from study.config import ConfigError, TrialConfig
from study.spec import METRIC_MODES

FORMATS = ("text", "csv", "markdown")  # what `study leaderboard --format` can print (study.leaderboard.format_table)

app = typer.Typer(
    help="caption-study: a Ray Tune study of recurrent image captioners. Does seeding the first LSTM layer's "
         "memory cell with the image (inject: init) compete with the other ways of injecting it?",
    no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)
data_app = typer.Typer(help="Generate or inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
# soft_wrap: never break an error message or a table row in the middle of a key name.
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="log at INFO level")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


# ----- data and features -------------------------------------------------------------------------------
@data_app.command("shapes")
def data_shapes(
    out_dir: Path = typer.Option(..., "--out", help="folder to write dataset.json and images/ into"),
    seed: int = typer.Option(0, help="generator seed (same seed and options give byte-identical files)"),
    images: int = typer.Option(1000, help="number of images (split 80/10/10 into train/val/test)"),
    image_size: int = typer.Option(128, help="side of the rendered images in pixels"),
) -> None:
    """Generate the embedded `shapes` dataset (rendered scenes, 5 grammar captions each)."""
    from study.data.shapes import generate_shapes

    path = generate_shapes(out_dir, images=images, seed=seed, image_size=image_size)
    out.print(f"wrote {path} ({images} images)")


@app.command()
def features(
    dataset_json: Path = typer.Argument(..., help="a Karpathy-split dataset JSON (e.g. dataset_flickr8k.json)"),
    images_root: Optional[Path] = typer.Option(None, help="folder of the images (default: <json folder>/images, "
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
        _fail(str(exc))
    state = "reused" if cache.reused else "computed"
    out.print(f"features {state}: {cache.path}")
    out.print(f"  {len(cache.keys)} images, pooled {tuple(cache.pooled.shape)}, grid {tuple(cache.grid.shape)}, "
              f"{cache.nbytes / 2**20:.1f} MiB, encoder {cache.encoder}")
    skipped = len(data.skipped) + len(cache.failed)
    if skipped:
        out.print(f"  skipped {skipped} images (missing or corrupt)")


# ----- one trial ---------------------------------------------------------------------------------------
def _epoch_table(history: list[dict]) -> Table:
    from study.spec import format_metric

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
        _fail("--overwrite and --resume contradict each other: --resume continues the run in --out, "
              "--overwrite replaces it")
    if out_dir is None and (overwrite or resume):
        _fail(f"--{'resume' if resume else 'overwrite'} needs --out: the folder of the run to "
              f"{'continue' if resume else 'replace'}")
    if out_dir is None:
        _writable_folder(TRAIN_RUNS)
        return _new_run_folder(TRAIN_RUNS, run_name)
    held = [name for name in RUN_FILES if (out_dir / name).exists()]
    if resume and not (out_dir / "checkpoint.pt").is_file():
        _fail(f"nothing to resume: {out_dir} holds no checkpoint.pt")
    if held and not (resume or overwrite):
        _fail(f"{out_dir} already holds a run ({', '.join(held)}); not overwriting it. Pass --overwrite to "
              "replace it, --resume to continue it, or leave out --out to train into a new folder under "
              f"{TRAIN_RUNS}")
    _writable_folder(out_dir)
    return out_dir


def _writable_folder(folder: Path) -> None:
    """Create ``folder`` and write a scratch file in it: a read-only or impossible path fails now, with its
    name, rather than with a traceback when the first result is saved."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        _fail(f"cannot write to {folder}: {exc.strerror or exc}")


@app.command()
def train(
    config: Path = typer.Argument(..., help="trial YAML: cell, layers, hidden, tokens, inject, epochs, dataset..."),
    out_dir: Optional[Path] = typer.Option(
        None, "--out", help=f"writes metrics.json and checkpoint.pt here (default: a new folder "
                            f"{TRAIN_RUNS}/<run name>-<date>-<time>); a folder holding a run is refused unless "
                            "--overwrite or --resume"),
    epochs: Optional[int] = typer.Option(None, help="override the config's epochs (at least 1)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: cuda when present)"),
    test: bool = typer.Option(True, help="score the test split with beam search and the full metric suite"),
    resume: bool = typer.Option(False, help="continue from the checkpoint in --out"),
    overwrite: bool = typer.Option(False, help="replace the run already in --out"),
) -> None:
    """Train one configuration without Ray (the same loop the Tune trainable runs)."""
    from study.checkpoints import CheckpointError, copy_checkpoint
    from study.config import load_trial_config
    from study.data.features import ImageReadError
    from study.data.karpathy import DatasetError
    from study.data.prepare import TokenSetting, prepare
    from study.registry import METHODS
    from study.spec import format_metric
    from study.training import TrialDiverged, run_trial, write_metrics

    if epochs is not None and epochs < 1:  # `--epochs 0` was once ignored; it would train nothing
        _fail(f"--epochs must be at least 1, got {epochs}")
    try:
        cfg = load_trial_config(config, {"epochs": epochs} if epochs is not None else None)
    except ConfigError as exc:
        _fail(str(exc))
    console.print(f"[bold]{cfg.run_name}[/] for {cfg.epochs} epochs on {cfg.dataset.kind}")
    console.print(_effective_config(cfg, config), highlight=False)
    fresh = out_dir is None
    out_dir = _train_out_dir(out_dir, cfg.run_name, overwrite=overwrite, resume=resume)
    console.print(f"output: {out_dir}", highlight=False)
    try:
        data = prepare(cfg.dataset, [TokenSetting.of(cfg)], need_grid=METHODS[cfg.inject].needs_grid,
                       device=device)
    except (DatasetError, ImageReadError, FileNotFoundError, ValueError) as exc:
        if fresh:
            out_dir.rmdir()  # nothing was written: leave no empty run folder behind
        _fail(str(exc))
    if overwrite:  # only once the data is ready: a run that fails before training keeps the old one
        for name in RUN_FILES:
            (out_dir / name).unlink(missing_ok=True)
    resume_from = out_dir if resume else None

    def on_epoch(metrics: dict) -> None:
        shown = ("train_loss", "val_loss", "val_bpc", "val_CIDEr-D", "val_BLEU-4")
        console.print(f"epoch {metrics['epoch']:>3}: " + "  ".join(
            f"{k.removeprefix('val_')} {format_metric(k, metrics[k])}" for k in shown)
            + f"  ({metrics['epoch_seconds']:.1f} s)", highlight=False)

    def report(metrics: dict, checkpoint_dir: Path) -> None:
        copy_checkpoint(checkpoint_dir.parent, out_dir)

    try:
        result = run_trial(cfg, data, work_dir=out_dir / ".work", report=report, resume_from=resume_from,
                           device=device, final_test=test, on_epoch=on_epoch)
    except (CheckpointError, TrialDiverged) as exc:
        _fail(str(exc))
    path = write_metrics(result, out_dir)
    console.print(_epoch_table(result["epochs"]))
    if "final" in result:
        final = result["final"]
        console.print(f"test (beam {final['beam_size']}): " + "  ".join(
            f"{k} {format_metric(k, v)}" for k, v in final.items() if isinstance(v, float)), highlight=False)
    out.print(f"metrics: {path}\ncheckpoint: {out_dir / 'checkpoint.pt'}")


@app.command()
def caption(
    images: list[Path] = typer.Argument(..., help="image files to caption"),
    checkpoint: Path = typer.Option(..., help="checkpoint.pt written by `study train` or a study trial"),
    beam_size: int = typer.Option(3, help="1 = greedy"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: cuda when present)"),
) -> None:
    """Caption real image files with a trained checkpoint."""
    from study.inference import caption_files

    try:
        for path, text in caption_files(checkpoint, images, beam_size=beam_size, device=device):
            typer.echo(f"{path}\t{text}")  # tab-separated, for scripts
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


# ----- studies -----------------------------------------------------------------------------------------
def _open_study(study: str, storage: Optional[Path], *, started: bool = True):
    """The study named on the command line (a name under --storage or ./runs, or a folder), with the spec,
    storage and MLflow store it ran with; ``started``: fail unless its search has begun."""
    from study.paths import StudyRecordError
    from study.study import Study, StudyNotFound

    try:
        found = Study.open(study, storage)
    except (StudyNotFound, StudyRecordError, ConfigError) as exc:
        _fail(str(exc))
    if started and not found.search_started():
        # A study that stopped before its search began (e.g. a bad image in data preparation) has a study.json but
        # no Tune state and no trials: say so and how to go on, rather than fail on its missing MLflow experiment.
        _fail(f"study {found.name!r} has no trials yet: its search has not started (no Tune state in "
              f"{found.paths.root}). Either it is still preparing its data, or it stopped there (e.g. at a bad "
              f"image): fix what its `study run` reported, then continue it with: study resume {found.paths.root}")
    return found


@app.command()
def run(
    spec_path: Path = typer.Argument(..., metavar="SPEC.yaml", help="search-space YAML (see search_spaces/)"),
    address: Optional[str] = typer.Option(None, help="Ray address ('auto' on a cluster; default: a local Ray)"),
    dry_run: bool = typer.Option(False, help="print the space and the trial budget, then stop"),
    max_concurrent: Optional[int] = typer.Option(None, help="trials at once (default: what resources allow)"),
    report: bool = typer.Option(True, help="after the search: confirm stage and report, as the spec says"),
    storage: Optional[str] = typer.Option(None, help="override the spec's storage (a folder or an s3:// URI)"),
    tracking_uri: Optional[str] = typer.Option(None, help="override the spec's MLflow tracking URI"),
    new: bool = typer.Option(False, "--new", help="if a study of this name exists, start a new one beside it "
                                                  "(NAME-2, NAME-3, ...) instead of refusing"),
) -> None:
    """Run a study: prepare data once, then Ray Tune with Optuna + ASHA, tracked in MLflow."""
    from study.spec import load_spec
    from study.study import Study
    from study.tuning import describe_budget

    try:
        spec = load_spec(spec_path, storage=storage, tracking_uri=tracking_uri)
    except ConfigError as exc:
        _fail(str(exc))
    out.print(describe_budget(spec), highlight=False)
    if dry_run:
        return
    study = Study.from_spec(spec, spec_path)
    if new and study.exists():
        existing = study
        study = study.fresh()
        out.print(f"study {existing.name} exists at {existing.paths.root}; starting a new study {study.name} "
                  f"beside it, in {study.paths.root}", highlight=False)
    _run_and_summarise(study, address, max_concurrent, resume=False, report=report)


def _lock_study(study, command: str):
    """Take the study's driver lock (one driver per study, see study/lock.py) or fail naming its holder."""
    from study.lock import StudyInUse

    try:
        lock = study.lock(command)
    except StudyInUse as exc:
        _fail(str(exc))
    if lock.took_over:
        console.print(f"[yellow]{lock.took_over}[/]", highlight=False)
    return lock


def _run_and_summarise(study, address, max_concurrent, *, resume: bool, report: bool) -> None:
    from study.leaderboard import format_table, leaderboard

    spec = study.spec
    _writable_folder(study.paths.root)
    with _lock_study(study, f"study {'resume' if resume else 'run'} {spec.name}"):
        if not resume and study.exists():
            # Running a spec again would add a second round of trials to the study it already made.
            _fail(f"study {spec.name} already exists at {study.paths.root}. Continue it with:  "
                  f"{study.resume_command()}   or start a new study beside it with:  study run {study.spec_path} --new")
        out.print(f"MLflow store: {study.tracking_uri} (experiment {study.experiment})")
        try:
            outcome = study.search(address=address, max_concurrent=max_concurrent, resume=resume,
                                   echo=lambda line: console.print(line, highlight=False))
        except KeyboardInterrupt:
            outcome = None
        if outcome is None or outcome.interrupted:
            console.print(f"[yellow]study interrupted.[/] Resume with:  {study.resume_command()}", highlight=False)
            raise typer.Exit(130)
        table = outcome.trials
        counts = table["status"].value_counts().to_dict() if table is not None and len(table) else {}
        out.print(f"study {spec.name} finished in {outcome.seconds:.0f} s: {counts}")
        # From the study's own results, not MLflow: a tracking server that is down must not end the study here.
        out.print(format_table(leaderboard(table, metric=spec.metric, mode=spec.mode), "text"))
        if report and spec.stratify == "inject":
            study.report(console=out)


@app.command()
def resume(
    study: str = typer.Argument(..., help="study name (under --storage) or its folder"),
    storage: Optional[Path] = typer.Option(None, help="storage folder the study was run with (default ./runs)"),
    address: Optional[str] = typer.Option(None, help="Ray address"),
    report: bool = typer.Option(True, help="confirm stage and report after the search"),
) -> None:
    """Continue an interrupted study: finished trials are kept, running ones continue from checkpoints."""
    _run_and_summarise(_open_study(study, storage, started=False), address, None, resume=True, report=report)


@app.command("leaderboard")
def leaderboard_cmd(
    study: str = typer.Argument(..., help="study name (under --storage) or its folder"),
    storage: Optional[Path] = typer.Option(None, help="storage folder (default ./runs)"),
    metric: str = typer.Option("val_CIDEr-D", help="metric to sort by: " + ", ".join(METRIC_MODES)),
    mode: Optional[str] = typer.Option(None, help="max or min (default: the direction in which --metric is better)"),
    fmt: str = typer.Option("text", "--format", help=", ".join(FORMATS)),
    all_trials: bool = typer.Option(False, "--all", help="every trial, not just the best of each method"),
) -> None:
    """The best trial of each injection method and overall (each trial's best epoch), from the study's own
    results in its storage; MLflow is only a mirror of them."""
    from study.leaderboard import format_table, leaderboard

    # Checked before anything is read: a misspelt metric or mode used to sort silently by nothing.
    if metric not in METRIC_MODES:
        _fail(f"--metric {metric!r} is not a metric a trial reports; allowed: {', '.join(METRIC_MODES)}")
    if mode is None:
        mode = METRIC_MODES[metric]
    elif mode not in ("max", "min"):
        _fail(f"--mode {mode!r} is not a mode; allowed: max, min")
    if fmt not in FORMATS:
        _fail(f"--format {fmt!r} is not a format; allowed: {', '.join(FORMATS)}")
    trials, _ = _open_study(study, storage).tables()
    board = leaderboard(trials, metric=metric, mode=mode, best_per_method=not all_trials)
    out.print(format_table(board, fmt), highlight=False, soft_wrap=True)


@app.command()
def sync(
    study: str = typer.Argument(..., help="study name (under --storage) or its folder"),
    storage: Optional[Path] = typer.Option(None, help="storage folder (default ./runs)"),
) -> None:
    """Send results journalled while the MLflow server was down."""
    tracker = _open_study(study, storage, started=False).tracker()
    pending = tracker.pending
    if tracker.flush(force=True):
        out.print(f"sent {pending} journalled events to {tracker.uri}")
    else:
        _fail(f"MLflow at {tracker.uri} is still not reachable; {tracker.pending} events wait in {tracker.journal}")


@app.command("report")
def report_cmd(
    study: str = typer.Argument(..., help="study name (under --storage) or its folder"),
    storage: Optional[Path] = typer.Option(None, help="storage folder (default ./runs)"),
    address: Optional[str] = typer.Option(None, help="Ray address for the confirm stage"),
) -> None:
    """Run the confirm stage if needed, compute the verdict, write the report and log it to MLflow."""
    found = _open_study(study, storage)
    with _lock_study(found, f"study report {found.name}"):  # two confirm stages would train the same runs twice
        found.report(console=out, address=address)


@app.command()
def decide(
    study: str = typer.Argument(..., help="study name (under --storage) or its folder"),
    max_seeds: Optional[int] = typer.Option(None, min=1, help="most seeds per method (default: the spec's "
                                            "confirm.max_seeds; needed when the spec planned none)"),
    hours: Optional[float] = typer.Option(None, min=0, help="stop adding seeds after this many hours"),
    storage: Optional[Path] = typer.Option(None, help="storage folder (default ./runs)"),
    address: Optional[str] = typer.Option(None, help="Ray address for the added confirm runs"),
) -> None:
    """Buy certainty for an inconclusive verdict: add one confirm seed at a time to init and the best other
    method until the verdict is decided, or the seed or time budget ends. Every look uses a sequential plan's
    level (Bonferroni over the planned looks), so the error rate stays bounded; then the report is rewritten."""
    found = _open_study(study, storage)
    with _lock_study(found, f"study decide {found.name}"):
        try:
            found.decide(max_seeds=max_seeds, hours=hours, address=address, console=out)
        except (ConfigError, ValueError) as exc:
            _fail(str(exc))


@app.command()
def export(
    study: str = typer.Argument(..., help="study name (under --storage) or its folder"),
    dest: Path = typer.Argument(..., help="folder to write into, e.g. results/NAME"),
    storage: Optional[Path] = typer.Option(None, help="storage folder (default ./runs)"),
) -> None:
    """Copy a reported study's results into a folder to commit or share: report.md/.html and figures,
    provenance, the spec, the search's trials and learning curves, the confirm runs and the verdict as CSV.
    No checkpoints, no features."""
    found = _open_study(study, storage)
    try:
        written = found.export(dest)
    except FileNotFoundError as exc:
        _fail(str(exc))
    out.print(f"wrote {len(written)} files to {dest}: {', '.join(p.name for p in written)}", highlight=False)


def main() -> None:  # pragma: no cover
    try:
        app()
    except ConfigError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)
