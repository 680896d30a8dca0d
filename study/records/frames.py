"""A study's results as pandas DataFrames: the Python API beside the ``study`` command.

    import study

    s = study.load("quickstart")          # a study name under ./runs, a study folder, or name + storage=
    s.trials()        # one row per search trial: parameters, status, epochs, its best epoch's metrics
    s.history()       # one row per trial and epoch: every reported metric (learning curves)
    s.leaderboard()   # the best trial of each injection method, the overall best first
    s.confirm_runs()  # one row per confirm run: method, config rank, seed (k of -s<k>), torch_seed (1000 + k), scores
    s.verdict()       # one row per method: role, seeds, CIDEr-D and ROUGE-L means with intervals
    s.test_scores()   # one row per method: every corpus-level test metric, mean and sd over seeds

Everything is read from the study's own folder (Tune's trial folders and the confirm stage's JSON files), as
``study leaderboard`` and ``study report`` read it: no MLflow server, no Ray, no GPU. ``Study``'s frames and
every CSV ``export`` writes hold scores in points (x100, as papers print them); this module's ``*_frame``
functions, which the stages and the analysis read, keep pycocoevalcap's 0..1 scale. Reading is cheap and always
current, so a running study can be watched by calling the methods again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from analysis.scores import CORPUS_METRICS
from study.records.paths import StudyPaths
from study.records.reader_types import with_reader_types

if TYPE_CHECKING:
    from study.context import StudyContext
    from study.spec import StudySpec


def trials_frame(ctx: "StudyContext") -> pd.DataFrame:
    """``Study.trials``: the search's trial table in reader types."""
    return with_reader_types(ctx.tables()[0], ctx.spec)


def history_frame(ctx: "StudyContext") -> pd.DataFrame:
    """``Study.history``: one row per trial and epoch."""
    return with_reader_types(ctx.tables()[1])


def leaderboard_frame(ctx: "StudyContext", *, metric: str | None = None, best_per_method: bool = True) -> pd.DataFrame:
    """``Study.leaderboard``: the trials sorted by ``metric`` (default: the spec's), best per method first."""
    from study.leaderboard import leaderboard
    from study.spec import METRIC_MODES

    metric = metric or ctx.spec.metric
    mode = ctx.spec.mode if metric == ctx.spec.metric else METRIC_MODES.get(metric, "max")
    return leaderboard(trials_frame(ctx), metric=metric, mode=mode, best_per_method=best_per_method)


def confirm_frame(paths: StudyPaths, spec: "StudySpec | None" = None) -> pd.DataFrame:
    """``Study.confirm_runs``: one row per finished confirm run (conditional parameters <NA> where inactive)."""
    from study.records.run_results import read_confirm_results

    rows = []
    for name, result in read_confirm_results(paths).items():
        row = {"run": name, **result.identity(), "torch_seed": result.config.get("seed")}  # the index k, 1000 + k
        row.update({m: result.scores.get(m) for m in CORPUS_METRICS})
        row.update(epochs=result.epochs, train_seconds=result.train_seconds, seconds=result.seconds,
                   params=result.params)
        row.update(result.chosen_columns())  # which epoch's model the run was scored with, and why training stopped
        row.update({k: v for k, v in result.config.items() if k not in row})
        rows.append(row)
    columns = ["run", "method", "config_rank", "seed", "torch_seed", *CORPUS_METRICS, "epochs", "train_seconds",
               "seconds", "params"]
    return with_reader_types(pd.DataFrame(rows, columns=None if rows else columns), spec)


def per_image_frame(paths: StudyPaths) -> pd.DataFrame:
    """``Study.per_image``: one row per confirm run and test image (``ScoredRun.per_image_rows``)."""
    from study.records.run_results import read_confirm_results

    rows = [row for result in read_confirm_results(paths).values() for row in result.per_image_rows()]
    return with_reader_types(pd.DataFrame(rows))


def verdict_frame(ctx: "StudyContext") -> pd.DataFrame:
    """``Study.verdict``: the verdict table with its words and interval in ``attrs``."""
    from study.records.comparing import read_comparator, test_set_name
    from study.records.decide_log import report_level
    from study.records.verdicts import set_verdict

    spec = ctx.spec
    verdict = set_verdict(per_image_frame(ctx.paths), confirm_frame(ctx.paths, spec), spec=spec,
                          level=report_level(spec, ctx.paths), comparator=read_comparator(ctx.paths),
                          set_name=test_set_name(spec))
    table = with_reader_types(verdict.table)
    table.attrs.update(verdict=verdict.verdict, diff=verdict.diff, ci=verdict.ci, best_other=verdict.best_other,
                       margin=verdict.margin, level=verdict.level, text=verdict.text)
    return table


def test_scores(runs: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """``analysis.scores.corpus_scores`` of the confirm runs, arms in ``order`` (the spec's)."""
    from analysis.scores import corpus_scores

    return corpus_scores(runs, order=order)


def test_scores_markdown(table: pd.DataFrame) -> str:
    """``test_scores`` as a Markdown table, scores x100 as mean ± standard deviation over seeds."""
    from analysis.render import markdown_table
    from analysis.scores import corpus_rows

    return markdown_table(*corpus_rows(table)) + "\n"
