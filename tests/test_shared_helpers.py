"""The helpers every layer shares: one missing-value test (study/records/), one Markdown table writer."""

from __future__ import annotations

import numpy as np
import pandas as pd

from study.records import missing


def test_missing_is_true_for_every_absent_value_and_false_for_every_value():
    # What tables, Tune results and JSON records hold for "no value": the five NaN tests it replaced each knew
    # only some of these (pandas' NA slipped past `v == v`, numpy's NaN past `is None`).
    for absent in (None, float("nan"), np.float32("nan"), np.float64("nan"), pd.NA, pd.NaT):
        assert missing(absent), absent
    for value in (0, 0.0, 1, 0.5, -1e-30, True, False, "", "nan?", [float("nan")], np.array([1.0, 2.0]), {}):
        assert not missing(value), value


def test_one_markdown_table_writer_for_the_report_test_scores_and_the_leaderboard():
    """The leaderboard's Markdown came from pandas' to_markdown when tabulate was installed (aligned columns) and
    from a hand-written writer when not: now one writer, the report's, whatever is installed."""
    from analysis.render import markdown_table
    from study.leaderboard import format_table

    frame = pd.DataFrame({"run": ["init-lstm-1x16", "par|odd"], "inject": ["init", "par"],
                          "val_CIDEr-D": [0.2173, float("nan")], "lr": [0.005276470510290681, 0.001]})
    table = format_table(frame, "markdown")
    assert table == markdown_table(["run", "inject", "val_CIDEr-D", "lr"],
                                   [["init-lstm-1x16", "init", "21.7", "0.005276"], ["par|odd", "par", "-", "0.001"]])
    assert table.splitlines()[:2] == ["| run | inject | val_CIDEr-D | lr |", "|---|---|---|---|"]
    assert table.splitlines()[3] == "| par\\|odd | par | - | 0.001 |"  # a | inside a cell is escaped
