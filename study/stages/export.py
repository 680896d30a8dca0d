"""``study export``: what a study produced, copied into a folder of a repository (``results/<name>/``) for readers
and reviewers: the report and its figures, the spec, the frames as CSV in points (``study.records.frames``), and what
recomputes every interval (``study.records.statistics``). Never a checkpoint or a feature.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from analysis.metric_table import in_points
from study.records import (
    EXPORT_MANIFEST,
    SCORES_IN_POINTS,
    ExportManifest,
    read_export_manifest,
    scores_in_points,
    write_export_manifest,
)
from study.records.frames import (
    confirm_frame,
    history_frame,
    leaderboard_frame,
    per_image_frame,
    test_scores,
    test_scores_markdown,
    trials_frame,
)
from study.records.provenance import read_report_provenance
from study.records.statistics import FILES as STATISTICS_FILES

if TYPE_CHECKING:
    from study.context import StudyContext


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
    if not force:
        raise ExportRefused(f"{dest} is not empty: export into a new folder, or pass --force to replace what a "
                            "previous export wrote there (other files are left alone)")
    previous = read_export_manifest(dest).files
    for name in [*previous, EXPORT_MANIFEST]:
        (dest / Path(name).name).unlink(missing_ok=True)


def _check_report(ctx: "StudyContext") -> None:
    """Refuse a study with no report, or one whose report predates scores in points."""
    paths = ctx.paths
    if not (paths.report / "report.md").is_file():
        raise FileNotFoundError(f"{paths.report / 'report.md'} does not exist: run `{ctx.command('report')}` first")
    if not scores_in_points(read_report_provenance(paths)):
        raise ExportRefused(f"the report of {ctx.name} predates scores in points (its verdict.csv holds the 0..1 "
                            f"scale): run `{ctx.command('report')}` again first (no run is retrained)")


def _refuse_others_files(ctx: "StudyContext", dest: Path, evaluated: list[str]) -> None:
    """Refuse, by name, a file of the user's in ``dest`` that the export would overwrite."""
    paths = ctx.paths
    names = [p.name for p in paths.report.iterdir() if p.name in _REPORT_FILES or p.suffix == ".png"]
    names += ["spec.yaml", *(p.name for p in (paths.verdict_csv, paths.search_time, paths.decide) if p.is_file()),
              "leaderboard.csv", "trials.csv", "history.csv", "confirm_runs.csv", "confirm_history.csv",
              "test_scores.csv", "test_scores.md"]
    names += evaluated + list(STATISTICS_FILES) + ["comparator.json"]
    taken = sorted(name for name in names if (dest / name).exists())
    if taken:
        raise ExportRefused(f"{dest} holds files that are not a previous export's: {', '.join(taken)}; move them, "
                            "or export into another folder")


def export(ctx: "StudyContext", dest: Path, *, force: bool = False) -> list[Path]:
    """Copy what a study produced into ``dest`` (e.g. ``results/<name>/`` of a repository), never a checkpoint or a
    feature: the report and its figures, its provenance, the spec it ran, the search's trials and learning curves,
    the confirm runs, their validation curves and the verdict as CSV, the time budget ledger and ``study decide``'s
    looks, and what recomputes every interval (``study.records.statistics``: per-image scores, the bootstrap's settings,
    the verdicts, pairwise and margin tables; ``study verify`` checks them) with the test-split ledger's rows.
    Every number in them is the platform's own. ``dest`` must be outside the study and empty; ``force``
    first removes what the previous export there wrote (its ``export.json`` lists it). A file of the user's that
    the export would overwrite is refused by name. Returns the files written."""
    import shutil

    from study.records.run_results import confirm_history
    from study.records.verdicts import export_frames  # study evaluate's sets and pooled verdict ({} if never evaluated)

    dest = Path(dest)
    paths = ctx.paths
    _check_report(ctx)
    _clear_destination(ctx, dest, force)
    test_per_image = per_image_frame(paths)
    evaluated = export_frames(paths, ctx.spec, test_per_image)
    _refuse_others_files(ctx, dest, list(evaluated))
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
    write_export_manifest(dest, ExportManifest(study=ctx.name, files=[p.name for p in written],
                                               spec_folder=_spec_folder(ctx.spec_path), scores=SCORES_IN_POINTS))
    return written


def _statistics(ctx: "StudyContext", dest: Path, test_per_image: pd.DataFrame) -> list[Path]:
    """What recomputes the report's statistics (``study.records.statistics``): per-image scores, the bootstrap's
    settings,
    every set's verdict, pairwise and margin tables; the comparator's record; the test-split ledger's rows."""
    import shutil

    from study.records.statistics import write_ledger, write_statistics
    from study.records.verdicts import evaluated_sets, read_manifest, study_test_name

    paths = ctx.paths
    written = write_statistics(ctx, dest, test_per_image)
    if paths.comparator.is_file():
        written.append(Path(shutil.copy2(paths.comparator, dest / paths.comparator.name)))
    test_fp = read_report_provenance(paths).get("dataset fingerprint", "")
    splits = {study_test_name(ctx.spec): str(test_fp or ""),
              **{n: read_manifest(paths, n).fingerprint for n in evaluated_sets(paths)}}
    return written + write_ledger(ctx, dest, splits)


def _spec_folder(spec_path: Path) -> str:
    """The folder the spec's relative dataset paths start from, as ``study reproduce`` finds it in a reviewer's
    clone: a path inside its repository (``search_spaces``), or absolute when the spec lies in no repository."""
    from study.records.files import repository_root

    folder = Path(spec_path).resolve().parent
    root = repository_root(folder)
    return str(folder.relative_to(root)) if root else str(folder)


