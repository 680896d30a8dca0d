"""What a person reads in the terminal: `--help` and the leaderboard's numbers."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from study.cli.app import app
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

    code = ("from study.cli.app import quiet_libraries; quiet_libraries(); import warnings; "
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
            "    from study.cli.app import quiet_libraries; quiet_libraries()\n"
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


def test_without_a_terminal_each_step_is_one_plain_line_with_the_count_and_an_eta(capsys, monkeypatch):
    """In a log file, CI or under nohup a tqdm bar is `\\r` frames (or nothing without a terminal width): the
    search's trials, the confirm runs and `study evaluate`'s runs print one line per step instead."""
    import io
    import sys

    from study import progress

    clock = iter([100.0, 130.0, 160.0, 400.0])
    monkeypatch.setattr(progress, "_clock", lambda: next(clock))
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # not a terminal
    bar = progress.progress_bar(3, "confirm runs", unit="run", enabled=True)
    assert isinstance(bar, progress.LineProgress)
    bar.set_postfix_str("init-r1-s0", refresh=False)
    bar.update(1)
    bar.set_postfix_str("par-r1-s0", refresh=False)
    bar.update(1)
    bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["confirm runs: 1/3 runs done (init-r1-s0), 30 s elapsed, about 1 min 00 s left",
                     "confirm runs: 2/3 runs done (par-r1-s0), 1 min 00 s elapsed, about 30 s left",
                     "confirm runs: 3/3 runs done (par-r1-s0), 5 min 00 s elapsed"]
    # At most one line per min_interval_s (feature extraction updates per batch), but always the last.
    clock = iter([0.0, 1.0, 2.0, 3.0, 31.0, 32.0])
    bar = progress.progress_bar(5, "features", unit="img", enabled=True, min_interval_s=30)
    for _ in range(5):
        bar.update(1)
    assert [line.split(",")[0] for line in capsys.readouterr().err.splitlines()] == [
        "features: 1/5 imgs done", "features: 4/5 imgs done", "features: 5/5 imgs done"]
    assert progress.progress_bar(3, "quiet", enabled=False).disable  # --no-progress stays silent


def test_the_dry_run_shows_the_searched_space_as_a_table(tmp_path):
    """The header printed raw dicts: `inject: {'type': 'choice', 'values': ['init', ...]}`."""
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\ndataset: {kind: shapes, images: 60}\nfixed: {cell: lstm}\nspace:\n"
                    "  inject: {choice: [init, attention]}\n  lr: {loguniform: [2.0e-3, 1.0e-2]}\n"
                    "  hidden: {quniform: [64, 256, 64]}\n"
                    "  attention_dim: {choice: [32, 64], when: {inject: attention}}\n"
                    f"stratify: inject\nsearch: {{trials: 2}}\nstorage: {tmp_path / 'runs'}\n")
    result = CliRunner().invoke(app, ["run", str(spec), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "{'type'" not in result.output and "'values'" not in result.output
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["searched", "kind"])
    rows = [[cell.strip() for cell in line.split("  ") if cell.strip()] for line in lines[header + 1:header + 5]]
    assert rows == [["inject", "choice", "init, attention"], ["lr", "loguniform", "0.002 .. 0.01"],
                    ["hidden", "quniform", "64 .. 256, step 64"],
                    ["attention_dim", "choice", "32, 64", "inject = attention"]]
    # aligned: every row's values start in the header's "values" column
    column = lines[header].index("values")
    assert all(lines[header + 1 + i][column - 2:column] == "  " and lines[header + 1 + i][column] != " "
               for i in range(4))


def test_a_verdict_is_wrapped_to_100_columns_without_splitting_a_word():
    from study.console import wrapped

    text = ("verdict: inconclusive\n" + "Seeding the first LSTM layer's memory (init) scores CIDEr-D 197.1 "
            "[156.8, 238.3] against 188.3 [144.4, 234.8]; the difference init - par is 8.8 " * 6)
    lines = wrapped(text).splitlines()
    assert lines[0] == "verdict: inconclusive" and len(lines) > 5
    assert all(len(line) <= 100 for line in lines)
    assert " ".join(" ".join(lines).split()) == " ".join(text.split())  # nothing lost, no word split
    assert "/a/very/long/path/that/is/longer/than/the/width" * 3 in wrapped(
        "report: " + "/a/very/long/path/that/is/longer/than/the/width" * 3, width=40)


def test_help_shows_its_angle_bracket_placeholders():
    """Markdown help ate `<run name>-<date>-<time>` as an HTML tag: `study train --help` showed "a new folder
    runs/train/--" and `study features --help` "(default: /images, ...". Every `<...>` a help text holds shows."""
    import re

    import typer.main

    group = typer.main.get_command(app)
    checked = 0
    for name, command in group.commands.items():
        rendered = CliRunner().invoke(app, [name, "--help"], terminal_width=160, env={"COLUMNS": "160"}).output
        flat = " ".join(rendered.replace("│", " ").split())
        for param in command.params:
            for placeholder in re.findall(r"<[^<>`]+>[^\s`)]*", getattr(param, "help", None) or ""):
                assert placeholder in flat, (name, param.name, placeholder)
                checked += 1
    assert checked >= 2
    train = " ".join(CliRunner().invoke(app, ["train", "--help"], terminal_width=160).output.replace("│", " ").split())
    assert "a new folder runs/train/<run name>-<date>-<time>)" in train
    features = CliRunner().invoke(app, ["features", "--help"], terminal_width=160).output
    assert "(default: <json folder>/images, or" in " ".join(features.replace("│", " ").split())
