"""The ``study`` command: run / resume a Ray Tune study, report, decide, read and export the results (the
commands on one configuration, such as ``study train``, are in ``study.cli.trial_commands``).

Heavy imports (torch, ray, mlflow) happen inside the commands so ``study --help`` is instant.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from study.cli import evaluate_command as cli_evaluate
from study.cli import profile_command as cli_profile
from study.cli import trial_commands as cli_trial
from study.cli.study_commands import fail_on_full_disk, lock_study, open_study
from study.config import ConfigError
from study.configure import configure
from study.console import HELP_MARKUP, console, fail, out, writable_folder
from study.spec import METRIC_MODES

FORMATS = ("text", "csv", "markdown")  # what `study leaderboard --format` can print (study.leaderboard.format_table)

app = typer.Typer(
    help="caption-study: a Ray Tune study of recurrent image captioners. Does seeding the first LSTM layer's "
         "memory cell with the image (inject: init) compete with the other ways of injecting it?",
    no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
    rich_markup_mode=HELP_MARKUP)
app.add_typer(cli_trial.app)  # data shapes, features, train, caption: one configuration, no Ray
app.add_typer(cli_evaluate.app)  # evaluate: a study's confirm models on another dataset
app.add_typer(cli_profile.app)  # profile: where a study's search time went


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="log at INFO level, and show Ray's, Tune's "
                                      "and MLflow's own output (hidden by default)")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        quiet_libraries()


def quiet_libraries() -> None:
    """Hide the libraries' chatter from a study's console (Tune's configuration box, its TensorBoard hint and
    "Wrote the latest version of all result files", MLflow's "Creating initial MLflow database tables" and
    artifact download bars, Ray's start-up lines): the study prints its own progress. Set before any of them is
    imported; ``--verbose`` keeps them."""
    import os

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow configures its loggers
    # log_table appends to the study's tables by downloading them first, and each download drew a
    # "Downloading artifacts" bar between the verdict lines of `study report` and `study evaluate`.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy reporter, silent at verbose=0
    os.environ["STUDY_QUIET"] = "1"  # ray.init's own logging level (study.tuning.ray_compat.ensure_ray)
    # A warning meant for the person at the console (SPICE not computed, MLflow unreachable) as one line, not
    # Python's "path:line: RuntimeWarning: ..." followed by the source line that raised it.
    warnings.formatwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


# ----- studies -----------------------------------------------------------------------------------------
@app.command()
def run(
    spec_path: Path = typer.Argument(..., metavar="SPEC.yaml", help="search-space YAML (see search_spaces/)"),
    address: Optional[str] = typer.Option(None, help="Ray address ('auto' on a cluster; default: a local Ray)"),
    dry_run: bool = typer.Option(False, help="print the space and the trial budget, then stop"),
    max_concurrent: Optional[int] = typer.Option(None, min=1, help="trials at once (default: what resources "
                                                 "allow)"),
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
        fail(str(exc))
    study = Study.from_spec(spec, spec_path)
    if not dry_run and not new and study.exists() and study.search_started():
        _refuse_existing(study)  # before the header: the refusal is the answer, not the 12 lines of a plan
    out.print(describe_budget(spec), highlight=False)
    if dry_run:
        return
    if new and study.exists():
        existing = study
        study = study.as_new_study()
        out.print(f"study {existing.name} exists at {existing.paths.root}; starting a new study {study.name} "
                  f"beside it, in {study.paths.root}", highlight=False)
    _run_and_summarise(study, address, max_concurrent, resume=False, report=report)


def _refuse_existing(study) -> None:
    # Running a spec again would add a second round of trials to the study it already made.
    fail(f"study {study.spec.name} already exists at {study.paths.root}. Continue it with:  "
         f"{study.resume_command()}   or start a new study beside it with:  study run {study.spec_path} --new")


def _run_and_summarise(study, address, max_concurrent, *, resume: bool, report: bool) -> None:
    from study.leaderboard import format_table, leaderboard

    spec = study.spec
    writable_folder(study.paths.root)
    with lock_study(study, f"study {'resume' if resume else 'run'} {spec.name}"):
        if not resume and study.exists() and not study.search_started():
            # It stopped before its first trial (a spec refused while the data was prepared): nothing to keep, and
            # its copy of the spec is the refused one, so `study run` of the fixed spec starts it again (issue 33,
            # item 18).
            study.paths.spec_copy.unlink(missing_ok=True)
        elif not resume and study.exists():  # checked again under the lock: another driver may have made it since
            _refuse_existing(study)
        out.print(f"MLflow store: {study.tracking_uri} (experiment {study.experiment})")
        try:
            outcome = study.search(address=address, max_concurrent=max_concurrent, resume=resume,
                                   echo=lambda line: console.print(line, highlight=False))
        except KeyboardInterrupt:
            outcome = None
        except ConfigError as exc:  # found before the first trial: the data, or resources this machine lacks
            again = "" if study.search_started() else (
                f"; the study has no trials yet: fix {study.spec_path} and run `study run {study.spec_path}` again")
            fail(f"{exc}{again}")
        except OSError as exc:  # a full disk: stop in one sentence; what was written whole is kept
            fail_on_full_disk(exc, study, study.resume_command())
        if outcome is None or outcome.interrupted:
            console.print(f"[yellow]study interrupted.[/] Resume with:  {study.resume_command()}", highlight=False)
            raise typer.Exit(_interrupted_exit_code())
        table = outcome.trials
        counts = table["status"].value_counts().to_dict() if table is not None and len(table) else {}
        words = {"completed": "ran to the end", "stopped": "stopped early by ASHA", "errored": "errored"}
        ended = ", ".join(f"{n} {words.get(status, status)}" for status, n in counts.items()) or "no trials"
        after = "; the confirm stage and the report follow" if report and spec.stratified else ""
        out.print(f"search of study {spec.name} finished in {outcome.seconds:.0f} s: {sum(counts.values())} "
                  f"trials, {ended}{after}", highlight=False)
        # From the study's own results, not MLflow: a tracking server that is down must not end the study here.
        out.print(format_table(leaderboard(table, metric=spec.metric, mode=spec.mode), "text"))
        if report and spec.stratified:
            _report(study)


@app.command()
def resume(
    study: str = typer.Argument(..., help="study name (under --storage) or its folder"),
    storage: Optional[Path] = typer.Option(None, help="storage folder the study was run with (default ./runs)"),
    address: Optional[str] = typer.Option(None, help="Ray address"),
    report: bool = typer.Option(True, help="confirm stage and report after the search"),
) -> None:
    """Continue an interrupted study: finished trials are kept, running ones continue from checkpoints."""
    _run_and_summarise(open_study(study, storage, started=False), address, None, resume=True, report=report)


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
        fail(f"--metric {metric!r} is not a metric a trial reports; allowed: {', '.join(METRIC_MODES)}")
    if mode is None:
        mode = METRIC_MODES[metric]
    elif mode not in ("max", "min"):
        fail(f"--mode {mode!r} is not a mode; allowed: max, min")
    if fmt not in FORMATS:
        fail(f"--format {fmt!r} is not a format; allowed: {', '.join(FORMATS)}")
    trials, _ = open_study(study, storage).tables()
    board = leaderboard(trials, metric=metric, mode=mode, best_per_method=not all_trials)
    out.print(format_table(board, fmt), highlight=False, soft_wrap=True)


@app.command()
def sync(
    study: str = typer.Argument(..., help="study name (under --storage) or its folder"),
    storage: Optional[Path] = typer.Option(None, help="storage folder (default ./runs)"),
) -> None:
    """Send results journalled while the MLflow server was down (or rebuild a lost store from the journal)."""
    found = open_study(study, storage, started=False)
    with lock_study(found, f"study sync {found.name}"):  # a running driver sends its own; two syncs would race
        tracker = found.tracker()
        _send_journal(tracker)


def _send_journal(tracker) -> None:
    if tracker.flush(force=True):
        out.print(f"sent {tracker.events_sent} journalled events to {tracker.uri}")
        if tracker.journal.torn_tail():
            console.print(f"[yellow]the last line of {tracker.journal.path} is incomplete[/] (torn by a kill or a "
                          "full disk): it was left unsent", highlight=False)
    else:
        still = (f"MLflow's store {tracker.uri} still cannot be used (the warning above says why)"
                 if tracker.uri.startswith("sqlite:") else f"MLflow at {tracker.uri} is still not reachable")
        fail(f"{still}; {tracker.pending} events wait in {tracker.journal.path}")


@app.command("report")
def report_cmd(
    study: str = typer.Argument(..., help="study name (under --storage) or its folder"),
    storage: Optional[Path] = typer.Option(None, help="storage folder (default ./runs)"),
    address: Optional[str] = typer.Option(None, help="Ray address for the confirm stage"),
) -> None:
    """Run the confirm stage if needed, compute the verdict, write the report and log it to MLflow."""
    found = open_study(study, storage)
    with lock_study(found, f"study report {found.name}"):  # two confirm stages would train the same runs twice
        _report(found, address)


def _report(study, address: str | None = None) -> None:
    """The confirm stage and the report; a search in which no trial produced a score fails saying why."""
    from study.records.trial_tables import NoScoredTrial

    try:
        study.report(console=out, address=address)
    except (NoScoredTrial, ConfigError) as exc:  # nothing to confirm; the data changed since the search
        fail(str(exc))
    except OSError as exc:
        fail_on_full_disk(exc, study, f"study report {study.paths.root}")
    except KeyboardInterrupt:
        console.print(f"[yellow]confirm stage interrupted.[/] Finished confirm runs are kept; continue with:  "
                      f"study report {study.paths.root}", highlight=False)
        raise typer.Exit(_interrupted_exit_code()) from None


def _interrupted_exit_code() -> int:
    """143 when SIGTERM stopped the driver (as a shell reports a TERMed process), 130 for Ctrl-C."""
    from study.tuning import terminated

    return 143 if terminated() else 130


@app.command()
def decide(
    study: str = typer.Argument(..., help="study name (under --storage) or its folder"),
    max_seeds: Optional[int] = typer.Option(None, min=1, help="most seeds per method (default: the spec's "
                                            "confirm.max_seeds; needed when the spec planned none)"),
    hours: Optional[float] = typer.Option(None, min=0, help="stop adding seeds after this many hours"),
    storage: Optional[Path] = typer.Option(None, help="storage folder (default ./runs)"),
    address: Optional[str] = typer.Option(None, help="Ray address for the added confirm runs"),
    stricter: bool = typer.Option(False, "--stricter", help="also re-judge a study already decided at the fixed "
                                  "95% level under a sequential plan (its stricter level may add seeds)"),
) -> None:
    """Buy certainty for an inconclusive verdict: add one confirm seed at a time to the target arm and its
    comparator (fixed before the test split was scored) until the verdict is decided, or the seed or time
    budget ends. Every look uses a sequential plan's level (Bonferroni over the planned looks), so the error
    rate stays bounded; then the report is rewritten."""
    found = open_study(study, storage)
    with lock_study(found, f"study decide {found.name}"):
        try:
            found.decide(max_seeds=max_seeds, hours=hours, address=address, console=out, stricter=stricter)
        except (ConfigError, ValueError) as exc:
            fail(str(exc))


@app.command()
def export(
    study: str = typer.Argument(..., help="study name (under --storage) or its folder"),
    dest: Path = typer.Argument(..., help="folder to write into, e.g. results/NAME"),
    storage: Optional[Path] = typer.Option(None, help="storage folder (default ./runs)"),
    force: bool = typer.Option(False, "--force", help="replace a previous export in DEST (only the files its "
                               "export.json lists)"),
) -> None:
    """Copy a reported study's results into a folder to commit or share: report.md/.html and figures,
    provenance, the spec, the search's trials and learning curves, the confirm runs and the verdict as CSV.
    No checkpoints, no features. DEST must be outside the study folder and empty (or a previous export, with
    --force)."""
    from study.records import EXPORT_MANIFEST
    from study.stages.export import ExportRefused

    found = open_study(study, storage)
    try:
        written = found.export(dest, force=force)
    except (FileNotFoundError, ExportRefused) as exc:
        fail(str(exc))
    except OSError as exc:  # a read-only or full destination (issue 33, item 11)
        fail(f"cannot write the export to {dest}: {exc.strerror or exc}"
             + (f" ({exc.filename})" if exc.filename else ""))
    # export.json (the list of what was written) is a file of the export too: "wrote 17 files" once left it out.
    names = [p.name for p in written] + [EXPORT_MANIFEST]
    out.print(f"wrote {len(names)} files to {dest}: {', '.join(names)}", highlight=False)


@app.command()
def verify(
    export_dir: Path = typer.Argument(..., metavar="EXPORT_DIR", help="a `study export` folder, e.g. results/flickr8k"),
) -> None:
    """Recompute every interval and verdict of an export's report from the export alone (its per-image scores and
    the bootstrap's recorded settings; no study folder, no data) and check each against the exported tables.
    Exit 0 when every cell matches, 1 naming the first that does not, 2 when the folder cannot be verified."""
    from study.records.statistics import VerifyError
    from study.records.statistics import verify as recompute

    try:
        checked = recompute(export_dir)
    except VerifyError as exc:
        fail(str(exc))
    files = ", ".join(dict.fromkeys(checked.files))
    if checked.ok:
        out.print(f"verified: all {checked.checked} cells of {files} match their recomputation", highlight=False)
        return
    file, where, exported, recomputed = checked.mismatches[0]
    out.print(f"MISMATCH: {file}, {where}: exported {exported}, recomputed {recomputed} ({len(checked.mismatches)} "
              f"of {checked.checked} cells differ)", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def main() -> None:
    """The ``study`` console script and ``python -m study``: one entry, so both configure the process the same
    way and fail on a bad spec the same way (one sentence, exit 2)."""
    from study.records.run_results import RecordError

    configure()
    try:
        app()
    except (ConfigError, RecordError) as exc:  # a bad spec; a damaged record of the study folder, named
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)
