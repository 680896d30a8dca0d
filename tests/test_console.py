"""What a person reads in the terminal: `--help` and the leaderboard's numbers."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from study.cli import app
from study.leaderboard import format_table


@pytest.mark.parametrize("columns", [80, 120])
def test_help_wraps_sentences_as_paragraphs_and_shows_no_type_for_flags(columns):
    """Descriptions broke mid-sentence where the docstring's lines ended ("from the study's own / results"), and
    every flag showed a `<bool>` metavar, as if it took a value (fixed by study.configure, which the command's
    entry point, study.cli.main, calls first)."""
    from study.configure import configure

    configure()
    for command in ([], ["decide"], ["run"], ["train"]):
        result = CliRunner().invoke(app, [*command, "--help"], terminal_width=columns, env={"COLUMNS": str(columns)})
        assert result.exit_code == 0, result.output
        assert "<bool>" not in result.output, result.output
    top = CliRunner().invoke(app, ["--help"], terminal_width=columns, env={"COLUMNS": str(columns)}).output
    # In the commands panel a description's line ends early only where the description ends, never inside it.
    lines = top.splitlines()
    start = next(i for i, line in enumerate(lines) if "Commands" in line)
    rows = [line[1:-1] for line in lines[start + 1:] if line.startswith("│")]
    column = rows[0].index("Run a study")
    width = len(rows[0]) - column
    descriptions: list[list[str]] = []
    for row in rows:
        if row[:column].strip():
            descriptions.append([])
        descriptions[-1].append(row[column:].rstrip())
    for description in descriptions:
        for line in description[:-1]:
            next_word = description[description.index(line) + 1].split()[0]
            assert len(line) + 1 + len(next_word) > width - 2, (line, next_word)  # the next word did not fit


def test_tables_for_people_show_each_number_with_sensible_digits():
    frame = pd.DataFrame({"run": ["a", "b"], "inject": ["init", "par"], "lr": [0.005276470510290681, 0.0012],
                          "val_CIDEr-D": [0.34, 0.335], "val_loss": [2.76451, 2.8], "epochs": [3, 5]})
    for fmt in ("text", "markdown"):
        shown = format_table(frame, fmt)
        assert "0.005276" in shown and "0.005276470510290681" not in shown
        assert "34.0" in shown and "33.5" in shown  # one decimal for every score, x100
        assert "2.765" in shown and "2.800" in shown
    assert "0.005276470510290681" in format_table(frame, "csv")  # exports keep full precision


def test_a_warning_at_the_console_is_one_line_naming_what():
    """A new user's `study train` ended in Python's "…/study/metrics.py:141: RuntimeWarning: SPICE is not …"
    and the source line that raised it; the CLI (unless --verbose) prints the warning alone, as one line. Run in
    a fresh interpreter: pytest records warnings itself."""
    import subprocess
    import sys

    code = ("from study.cli import quiet_libraries; quiet_libraries(); import warnings; "
            "warnings.warn('SPICE is not computed (NaN)', RuntimeWarning)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "warning: SPICE is not computed (NaN)\n", done.stderr


def test_appending_to_a_study_table_draws_no_download_bar():
    """`study report` and `study evaluate` printed MLflow's "Downloading artifacts: 100%|...|" between their
    verdict lines: ``log_table`` downloads the table it appends to. The CLI turns MLflow's bars off (and
    --verbose keeps them); checked against a real sqlite store in a fresh interpreter, with the loud run first
    so the check can fail."""
    import os
    import subprocess
    import sys

    # This process may have run quiet_libraries already (a CLI test): the children start without its setting.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"}
    code = ("import sys, tempfile, pathlib\n"
            "if sys.argv[1] == 'quiet':\n"
            "    from study.cli import quiet_libraries; quiet_libraries()\n"
            "from mlflow import MlflowClient\n"
            "d = pathlib.Path(tempfile.mkdtemp())\n"
            "client = MlflowClient(tracking_uri=f'sqlite:///{d}/mlflow.db')\n"
            "experiment = client.create_experiment('x', artifact_location=(d / 'artifacts').as_uri())\n"
            "run = client.create_run(experiment).info.run_id\n"
            "for i in range(2):\n"
            "    client.log_table(run, {'a': [i]}, 'table.json')\n")
    shown = {}
    for mode in ("loud", "quiet"):
        done = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120,
                              env=env)
        assert done.returncode == 0, done.stderr
        shown[mode] = done.stderr
    assert "Downloading artifacts" in shown["loud"]
    assert "Downloading artifacts" not in shown["quiet"], shown["quiet"]
