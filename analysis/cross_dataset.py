"""The report's sections for the other photo collections a study was scored on (``study evaluate``), and for the
pooled verdict over every test set (``analysis.pooled``). Pure: verdicts, frames and figure paths in, blocks out
(``analysis.render``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from analysis.margins import margin_blocks
from analysis.metric_table import MEAN_OVER_IMAGES
from analysis.pooled import PooledVerdict
from analysis.render import Block
from analysis.report import pairwise_blocks
from analysis.scores import corpus_rows, corpus_scores, x100
from analysis.verdict import Verdict


def _with_ci(row: pd.Series, metric: str) -> str:
    if metric not in row or pd.isna(row[metric]):
        return "n/a"
    return f"{x100(row[metric])} [{x100(row[metric + '_lo'])}, {x100(row[metric + '_hi'])}]"


def dataset_blocks(name: str, manifest: Mapping, verdict: Verdict, runs: pd.DataFrame, gallery: Path | None, *,
                   order: list[str], missing: list[str] = ()) -> list[Block]:
    """One evaluated set: what it is, every run's corpus scores (mean ± sd over seeds), the verdict on it, init
    minus each method with paired intervals, and the gallery. ``missing``: confirm runs not scored on it (yet)."""
    level = f"{100 * verdict.level:.4g}%"
    blocks: list[Block] = [
        ("h2", f"Other photos: {name}"),
        ("p", f"Every confirm run's model captioned the {manifest.get('images', '?')} images of split "
              f"`{manifest.get('split', '?')}` of `{manifest.get('json', '?')}` with its own beam settings, scored "
              "with the full coco-caption suite against that set's raw reference captions (words outside the "
              "training vocabulary count, as coco-caption counts them). The verdict below is computed on these "
              "images alone (paired bootstrap over its images and the seeds).")]
    if missing:
        blocks.append(("p", f"{len(missing)} confirm run{'s are' if len(missing) != 1 else ' is'} not scored on {name} "
                            f"(added since it was evaluated, or left out): {', '.join(missing)}; `study evaluate` "
                            "with the same dataset scores only those."))
    table = corpus_scores(runs, order)
    if not table.empty:
        header, rows = corpus_rows(table)
        blocks += [("p", f"Corpus-level scores on {name} (x100), mean ± sd over seeds:"), ("table", header, rows)]
    # This section has no decision note (the test split's verdict has one): the paragraph must not point to it.
    text = verdict.text.replace(" (the decision note says whether more seeds could decide it)", "")
    blocks.append(("p", f"**Verdict on {name}: {verdict.target} {verdict.verdict}** (equivalence margin "
                        f"{x100(verdict.margin)} {verdict.metric} points). {text}"))
    if not verdict.table.empty:
        metrics = [m for m in MEAN_OVER_IMAGES if m in verdict.table and not verdict.table[m].isna().all()]
        blocks.append(("table", ["method", "seeds", "images", *[f"{m} [{level} CI]" for m in metrics]],
                       [[m, int(r["seeds"]), int(r["images"]), *[_with_ci(r, k) for k in metrics]]
                        for m, r in verdict.table.iterrows()]))
    blocks += pairwise_blocks(verdict, level, where=f" on {name}")
    blocks += margin_blocks(verdict.margins, verdict.target, verdict.best_other, verdict.metric, verdict.level,
                            where=f" on {name}")
    if gallery is not None:
        blocks.append(("img", gallery, f"images of {name} with each method's caption"))
    return blocks


def pooled_blocks(pooled: PooledVerdict) -> list[Block]:
    """The pooled verdict over every test set: each set's difference and weight, the pooled interval, and
    whether the pooled evidence decides."""
    blocks: list[Block] = [("h2", "Pooled verdict over every test set")]
    if pooled.sets.empty:
        return blocks + [("p", pooled.text)]
    level = f"{100 * pooled.level:.4g}%"
    rows = [[k, int(r["images"]), int(r["seeds"]), x100(r["diff"]), f"[{x100(r['lo'])}, {x100(r['hi'])}]",
             f"{r['weight']:.2f}", r["verdict"]] for k, r in pooled.sets.iterrows()]
    rows.append(["**pooled**", int(pooled.sets["images"].sum()), int(pooled.sets["seeds"].min()), x100(pooled.diff),
                 f"[{x100(pooled.ci[0])}, {x100(pooled.ci[1])}]", "1.00", pooled.verdict])
    decides = (f"**Pooled verdict: {pooled.target} {pooled.verdict}** (the pooled evidence "
               f"{'decides' if pooled.decides else 'does not decide'}).")
    return blocks + [
        ("p", f"{pooled.target} - {pooled.other} ({pooled.metric} x100) on each test set and pooled, {level} "
              "intervals (each set's from the same resamples as its own verdict); a set's weight is the inverse of "
              "its difference's bootstrap variance:"),
        ("table", ["test set", "images", "seeds", f"{pooled.target} - {pooled.other}", f"{level} CI", "weight",
                   "verdict at the margin"], rows),
        ("p", f"{decides} {pooled.text}")] + margin_blocks(pooled.margins, pooled.target, pooled.other,
                                                           pooled.metric, pooled.level, where=" pooled")
