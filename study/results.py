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

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from analysis.metric_table import in_points
from analysis.scores import CORPUS_METRICS
from study.files import atomic_write_json
from study.paths import StudyPaths
from study.reader_types import with_reader_types
from study.recompute import FILES as STATISTICS_FILES
from study.records import EXPORT_MANIFEST, SCORES_IN_POINTS, SCORES_KEY, scores_in_points

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
    from study.records import chosen_epoch

    rows = []
    for path in paths.confirm_results():
        result = json.loads(path.read_text())
        row = {"run": path.stem, "method": result["method"], "config_rank": result["config_rank"],
               "seed": result["seed"], "torch_seed": result["config"].get("seed")}  # the index k, and 1000 + k
        row.update({m: result["scores"].get(m) for m in CORPUS_METRICS})
        row.update({k: result.get(k) for k in ("epochs", "train_seconds", "seconds", "params")})
        row.update(chosen_epoch(result))  # which epoch's model the run was scored with, and why training stopped
        row.update({k: v for k, v in result["config"].items() if k not in row})
        rows.append(row)
    columns = ["run", "method", "config_rank", "seed", "torch_seed", *CORPUS_METRICS, "epochs", "train_seconds",
               "seconds", "params"]
    return with_reader_types(pd.DataFrame(rows, columns=None if rows else columns), spec)


def per_image_frame(paths: StudyPaths) -> pd.DataFrame:
    """``Study.per_image``: one row per confirm run and test image (``study.records.per_image_rows``)."""
    from study.records import per_image_rows

    rows = [row for path in paths.confirm_results() for row in per_image_rows(json.loads(path.read_text()))]
    return with_reader_types(pd.DataFrame(rows))


def verdict_frame(ctx: "StudyContext") -> pd.DataFrame:
    """``Study.verdict``: the verdict table with its words and interval in ``attrs``."""
    from study.comparing import read_comparator, test_set_name
    from study.records import report_level
    from study.verdicts import set_verdict

    spec = ctx.spec
    verdict = set_verdict(per_image_frame(ctx.paths), confirm_frame(ctx.paths, spec), spec=spec,
                          level=report_level(spec, ctx.paths), comparator=read_comparator(ctx.paths),
                          set_name=test_set_name(spec))
    table = with_reader_types(verdict.table)
    table.attrs.update(verdict=verdict.verdict, diff=verdict.diff, ci=verdict.ci, best_other=verdict.best_other,
                       margin=verdict.margin, level=verdict.level, text=verdict.text)
    return table


# Files a results folder holds besides the frames: the report (with its figures) and the study's own records.
_REPORT_FILES = ("report.md", "report.html", "provenance.json")


class ExportRefused(ValueError):
    """The export's destination is inside the study, or holds files an export of this study would not own."""


def _clear_destination(ctx: "StudyContext", dest: Path, force: bool) -> None:
    """Refuse a destination inside the study folder, and a non-empty one unless ``force``; with ``force`` remove
    the files a previous export listed in its manifest, and only those."""
    root = ctx.paths.root.resolve()
    target = dest.resolve()
    if target == root or root in target.parents:
        raise ExportRefused(f"{dest} is inside the study folder {root}: export to a folder of its own, e.g. "
                            f"results/{ctx.name}")
    if not dest.is_dir() or not any(dest.iterdir()):
        return
    manifest = dest / EXPORT_MANIFEST
    if not force:
        raise ExportRefused(f"{dest} is not empty: export into a new folder, or pass --force to replace what a "
                            "previous export wrote there (other files are left alone)")
    previous = json.loads(manifest.read_text())["files"] if manifest.is_file() else []
    for name in [*previous, EXPORT_MANIFEST]:
        (dest / Path(name).name).unlink(missing_ok=True)


def export(ctx: "StudyContext", dest: Path, *, force: bool = False) -> list[Path]:
    """Copy what a study produced into ``dest`` (e.g. ``results/<name>/`` of a repository), never a checkpoint or a
    feature: the report and its figures, its provenance, the spec it ran, the search's trials and learning curves,
    the confirm runs, their validation curves and the verdict as CSV, the time budget ledger and ``study decide``'s
    looks, and what recomputes every interval (``study.recompute``: per-image scores, the bootstrap's settings,
    the verdicts, pairwise and margin tables; ``study verify`` checks them) with the test-split ledger's rows.
    Every number in them is the platform's own. ``dest`` must be outside the study and empty; ``force``
    first removes what the previous export there wrote (its ``export.json`` lists it). A file of the user's that
    the export would overwrite is refused by name. Returns the files written."""
    import shutil

    dest = Path(dest)
    paths = ctx.paths
    if not (paths.report / "report.md").is_file():
        raise FileNotFoundError(f"{paths.report / 'report.md'} does not exist: run `{ctx.command('report')}` first")
    origin = paths.report / "provenance.json"
    if not scores_in_points(json.loads(origin.read_text()) if origin.is_file() else {}):
        raise ExportRefused(f"the report of {ctx.name} predates scores in points (its verdict.csv holds the 0..1 "
                            f"scale): run `{ctx.command('report')}` again first (no run is retrained)")
    _clear_destination(ctx, dest, force)
    from study.records import confirm_history
    from study.verdicts import export_frames  # study evaluate's sets and pooled verdict ({} if never evaluated)

    test_per_image = per_image_frame(paths)
    evaluated = export_frames(paths, ctx.spec, test_per_image)
    names = [p.name for p in paths.report.iterdir() if p.name in _REPORT_FILES or p.suffix == ".png"]
    names += ["spec.yaml", *(p.name for p in (paths.verdict_csv, paths.search_time, paths.decide) if p.is_file()),
              "leaderboard.csv", "trials.csv", "history.csv", "confirm_runs.csv", "confirm_history.csv",
              "test_scores.csv", "test_scores.md"]
    names += list(evaluated) + list(STATISTICS_FILES) + ["comparator.json"]
    taken = sorted(name for name in names if (dest / name).exists())
    if taken:
        raise ExportRefused(f"{dest} holds files that are not a previous export's: {', '.join(taken)}; move them, "
                            "or export into another folder")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(paths.report.iterdir()):
        if path.name in _REPORT_FILES or path.suffix == ".png":
            written.append(Path(shutil.copy2(path, dest / path.name)))
    (dest / "spec.yaml").write_text(ctx.spec_text)
    written.append(dest / "spec.yaml")
    for path in (paths.verdict_csv, paths.search_time, paths.decide):  # the report's table (in points), records
        if path.is_file():
            written.append(Path(shutil.copy2(path, dest / path.name)))
    runs = confirm_frame(paths, ctx.spec)
    # trials.csv carries every trial's id and parameters, so history.csv (by trial_id) joins onto it.
    frames = {"leaderboard.csv": leaderboard_frame(ctx, best_per_method=False), "trials.csv": trials_frame(ctx),
              "history.csv": history_frame(ctx), "confirm_runs.csv": runs,
              "confirm_history.csv": confirm_history(paths), "test_scores.csv": test_scores(runs, ctx.spec.methods)}
    frames.update(evaluated)
    for name, frame in frames.items():
        in_points(frame).to_csv(dest / name, index=False)
        written.append(dest / name)
    (dest / "test_scores.md").write_text(test_scores_markdown(frames["test_scores.csv"]))
    written.append(dest / "test_scores.md")
    written += _statistics(ctx, dest, test_per_image)
    manifest = {"study": ctx.name, "files": [p.name for p in written], "spec_folder": _spec_folder(ctx.spec_path),
                SCORES_KEY: SCORES_IN_POINTS}
    atomic_write_json(dest / EXPORT_MANIFEST, manifest, indent=2)
    return written


def _statistics(ctx: "StudyContext", dest: Path, test_per_image: pd.DataFrame) -> list[Path]:
    """What recomputes the report's statistics (``study.recompute``): per-image scores, the bootstrap's settings,
    every set's verdict, pairwise and margin tables; the comparator's record; the test-split ledger's rows."""
    import shutil

    from study.recompute import write_ledger, write_statistics
    from study.verdicts import evaluated_sets, read_manifest, study_test_name

    paths = ctx.paths
    written = write_statistics(ctx, dest, test_per_image)
    if paths.comparator.is_file():
        written.append(Path(shutil.copy2(paths.comparator, dest / paths.comparator.name)))
    origin = paths.report / "provenance.json"
    test_fp = json.loads(origin.read_text()).get("dataset fingerprint", "") if origin.is_file() else ""
    splits = {study_test_name(ctx.spec): str(test_fp or ""),
              **{n: str(read_manifest(paths, n).get("fingerprint", "")) for n in evaluated_sets(paths)}}
    return written + write_ledger(ctx, dest, splits)


def _spec_folder(spec_path: Path) -> str:
    """The folder the spec's relative dataset paths start from, as ``study reproduce`` finds it in a reviewer's
    clone: a path inside its repository (``search_spaces``), or absolute when the spec lies in no repository."""
    from study.files import repository_root

    folder = Path(spec_path).resolve().parent
    root = repository_root(folder)
    return str(folder.relative_to(root)) if root else str(folder)


def test_scores(runs: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """``analysis.scores.corpus_scores`` of the confirm runs, arms in ``order`` (the spec's)."""
    from analysis.scores import corpus_scores

    return corpus_scores(runs, order=order)


def test_scores_markdown(table: pd.DataFrame) -> str:
    """``test_scores`` as a Markdown table, scores x100 as mean ± standard deviation over seeds."""
    from analysis.render import markdown_table
    from analysis.scores import corpus_rows

    return markdown_table(*corpus_rows(table)) + "\n"
