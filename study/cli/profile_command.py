"""``study profile``: where a study's search time went (``study.profiling``). ``study.cli.app`` adds the command to
the ``study`` command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from study.console import HELP_MARKUP, fail, out

app = typer.Typer(rich_markup_mode=HELP_MARKUP)


@app.command()
def profile(
    study: str = typer.Argument(..., help="study name (under --storage) or its folder"),
    storage: Optional[Path] = typer.Option(None, help="storage folder the study was run with (default ./runs)"),
    markdown: bool = typer.Option(False, "--markdown", help="also print the table as Markdown"),
    slots: Optional[int] = typer.Option(None, help="concurrent trial slots (default: from the spec and --cpus)"),
    cpus: Optional[int] = typer.Option(None, help="CPUs the study ran on (default: this machine's)"),
    gpus: Optional[int] = typer.Option(None, help="GPUs the study ran on (for a spec with resources.gpu)"),
    mlflow_ms: Optional[float] = typer.Option(None, help="milliseconds per MLflow event (default: measured now on "
                                              "a fresh sqlite store)"),
) -> None:
    """Where the search's time went: its trial slots' time (slots x wall time, summed over resumes) split into
    training steps, data loading, validation loss, decoding, metrics, other per-epoch work, trial start/stop and
    Ray, MLflow (estimated), epochs cut short and idle slots. Read from the study's own files (Tune's results and
    snapshots, the tracking journal), so it runs while the study runs."""
    from datetime import datetime, timezone

    from study.cli.study_commands import open_study
    from study.profiling import format_markdown, format_text, profile_study

    folder = Path(study).expanduser()  # a study folder (a copy, another machine's) is read as it is
    if not (folder / "tune").is_dir():
        folder = open_study(study, storage, started=False).paths.root
    costs = None if mlflow_ms is None else {"*": mlflow_ms / 1000}
    try:
        found = profile_study(folder, slots=slots, cpus=cpus, gpus=gpus, mlflow_costs=costs)
    except ValueError as exc:
        fail(str(exc))
    out.print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n{format_text(found)}", highlight=False,
              soft_wrap=True, markup=False)
    if markdown:
        out.print(f"\n{format_markdown(found)}", highlight=False, soft_wrap=True, markup=False)
