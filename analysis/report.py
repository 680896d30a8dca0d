"""The study report: question, verdict with intervals, effects, figures, context, and what was run.

``build_report`` writes ``report.md`` with its PNGs beside it (relative links) and ``report.html``, the
same content as one self-contained file (PNGs embedded as base64) for MLflow's artifact viewer or e-mail.
Both are rendered from one list of blocks (``analysis.render``), so they cannot drift apart. Every section whose
input is empty
says so instead of failing: a report of a half-finished study is still worth reading.

Input frames (metric values on pycocoevalcap's 0..1 scale; the report prints x100):

* ``trials``: one row per search trial: ``trial_id, inject, <varied params>, status, epochs,
  val_CIDEr-D, ...`` (best-epoch values), ``train_seconds, params``.
* ``history``: one row per trial-epoch: ``trial_id, inject, epoch, val_CIDEr-D, ...``.
* ``per_image``: confirm stage, one row per (method, config_rank, seed, image_id) with the test metrics.
* ``runs``: confirm stage, one row per (method, config_rank, seed): ``params, train_seconds, epochs`` + metrics.
* ``space``: ``StudySpec.space_description()``; ``gallery``: ``image_path, method, caption, reference``.

The injection methods come in as data too: ``roles`` (``{method: "target" | "competitor" | "floor"}``) and
``colors`` (``{method: "#rrggbb"}``), both in display order, from the study's method registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis import plots
from analysis.costs import cost_blocks
from analysis.effects import Effects, compute_effects
from analysis.grouping import group_column
from analysis.margins import margin_blocks
from analysis.metric_table import MEAN_OVER_IMAGES, describe_metric, format_metric, lower_is_better
from analysis.render import Block, to_html, to_markdown
from analysis.scores import corpus_rows, corpus_scores
from analysis.scores import x100 as _x100
from analysis.verdict import PRIMARY, TEST_SET, Verdict, compute_verdict

QUESTION = (
    "A 2015 term project proposed the simplest encoder-decoder captioner: a frozen ImageNet CNN encodes the "
    "image to one vector, written into the memory cell of the first LSTM layer before decoding starts "
    "(memory seeding, **init**). Does a model that simple compete with the other ways of giving the decoder "
    "the image: the image as the first input step (**pre**, Show and Tell), at every step (**par**, LRCN), "
    "joined with the RNN's output before the softmax (**merge**, m-RNN), or soft attention over the CNN's "
    "spatial grid (**attention**, Show, Attend and Tell)? **none** (no image), where a study runs it, is the "
    "floor. Each method got the same tuning budget; the best configuration of each was retrained with several "
    "seeds and scored on the test split.")

# Tanti, Gatt & Camilleri 2018, Table: GRU decoders on frozen VGG16 features, mean of 3 runs (x100).
LITERATURE = [
    ("Flickr8k", "init", "19.1", "19.4", "48.1"), ("Flickr8k", "pre", "19.0", "19.1", "46.9"),
    ("Flickr8k", "par", "19.1", "19.3", "47.5"), ("Flickr8k", "merge", "17.8", "19.3", "46.9"),
    ("MSCOCO", "init", "27.1", "22.6", "81.8"), ("MSCOCO", "merge", "26.2", "22.2", "79.1"),
]
LITERATURE_NOTE = (
    "Other people's numbers on other data and models, for orientation only: Tanti, Gatt & Camilleri 2018 "
    "(\"Where to put the image in an image caption generator\"): GRU decoders on frozen VGG16 features, each "
    "architecture tuned separately, mean of 3 runs, coco-caption metrics x100. Show, Attend and Tell on "
    "Flickr8k reached BLEU-4 19.5 (soft) / 21.3 (hard); Show and Tell on MSCOCO BLEU-4 27.7, CIDEr 85.5. "
    "Tanti et al.'s untuned first version ranked init last: the verdict flips with tuning, which is why "
    "this study gives every method the same budget. They seed the hidden state h; this study seeds the "
    "memory cell c, which nobody has published.")


@dataclass
class ReportResult:
    path: Path  # report.md
    verdict: Verdict
    images: list[Path]  # the PNGs written (those whose input was not empty)
    html: Path | None = None  # report.html, PNGs embedded
    effects: Effects | None = None


def _with_ci(row: pd.Series, metric: str) -> str:
    if metric not in row or pd.isna(row[metric]):
        return "n/a"
    return f"{_x100(row[metric])} [{_x100(row[metric + '_lo'])}, {_x100(row[metric + '_hi'])}]"


def pairwise_blocks(verdict: Verdict, level: str, where: str = "") -> list[Block]:
    """The table of the target minus every method, each with its paired interval (``where``: " on <set>")."""
    if verdict.pairwise.empty:
        return []
    return [("p", f"{verdict.target} minus each method{where} ({verdict.metric} x100, {level} paired interval; "
                  "above 0: the target scores higher):"),
            ("table", ["method", f"{verdict.target} - method", f"{level} CI"],
             [[m, _x100(r["diff"]), f"[{_x100(r['lo'])}, {_x100(r['hi'])}]"] for m, r in verdict.pairwise.iterrows()])]


def _verdict_blocks(verdict: Verdict, image: Path | None, decision: str | None = None) -> list[Block]:
    blocks: list[Block] = [("h2", "Verdict")]
    if verdict.table.empty:
        return blocks + [("p", f"**{verdict.verdict}**. {verdict.text}")]
    blocks.append(("p", f"**{verdict.target} {verdict.verdict}** (equivalence margin {_x100(verdict.margin)} "
                        f"{verdict.metric} points). {verdict.text}"))
    metrics = [m for m in MEAN_OVER_IMAGES if m in verdict.table and not verdict.table[m].isna().all()]
    level = f"{100 * verdict.level:.4g}%"
    header = ["method", "config", "seeds", "images"] + [f"{m} [{level} CI]" for m in metrics] + [
        "params (M)", "train s / run", "epochs"]
    rows = []
    for method, row in verdict.table.iterrows():
        role = row.get("role", "")
        name = f"**{method}**" if role == "target" else (f"{method} (floor)" if role == "floor" else method)
        params = "n/a" if pd.isna(row.get("params", math.nan)) else f"{row['params'] / 1e6:.2f}"
        secs = "n/a" if pd.isna(row.get("train_seconds", math.nan)) else f"{row['train_seconds']:.0f}"
        epochs = "n/a" if pd.isna(row.get("epochs", math.nan)) else f"{row['epochs']:.0f}"
        rows.append([name, f"rank {int(row['config_rank'])}", int(row["seeds"]), int(row["images"]),
                     *[_with_ci(row, m) for m in metrics], params, secs, epochs])
    blocks.append(("table", header, rows))
    blocks.append(("p", f"Scores x100 on the test split: mean over seeds and test images (for these metrics the "
                        f"mean over images is the test-set score), with a {level} bootstrap "
                        "interval that resamples seeds and images (images shared across methods, so "
                        "differences are paired). \"config rank 1\" is each method's best search trial on "
                        "validation."))
    if verdict.best_other is not None:
        blocks.append(("p", f"Difference {verdict.target} - {verdict.best_other} ({verdict.metric}): "
                            f"{_x100(verdict.diff)} [{_x100(verdict.ci[0])}, {_x100(verdict.ci[1])}] "
                            f"(x100, paired bootstrap, {verdict.n_boot} resamples)."))
    blocks += pairwise_blocks(verdict, level) + margin_blocks(verdict.margins, verdict.target, verdict.best_other,
                                                              verdict.metric, verdict.level)
    if decision:
        blocks.append(("p", decision))
    if image is not None:
        blocks.append(("img", image, f"{verdict.metric} per method with {level} intervals"))
    return blocks


def _run_blocks(trials: pd.DataFrame, history: pd.DataFrame, runs: pd.DataFrame) -> list[Block]:
    blocks: list[Block] = [("h2", "What was run")]
    if trials is None or trials.empty:
        blocks.append(("p", "No search trials were recorded."))
    else:
        status = trials["status"] if "status" in trials else pd.Series("unknown", index=trials.index)
        by = trials[group_column(trials)] if group_column(trials) in trials else pd.Series("all", index=trials.index)
        counts = pd.crosstab(by, status, margins=True, margins_name="total")
        header = ["method", *counts.columns]
        rows = [[str(i), *[int(v) for v in r]] for i, r in counts.iterrows()]
        blocks += [("p", "Search trials by injection method and how they ended (stopped = ASHA cut them early):"),
                   ("table", header, rows)]
        epochs = (int(trials["epochs"].sum()) if "epochs" in trials
                  else (len(history) if history is not None else 0))
        facts = [f"{len(trials)} trials, {epochs} trial-epochs trained in the search"]
        if "train_seconds" in trials and trials["train_seconds"].notna().any():
            facts.append(f"{trials['train_seconds'].sum() / 3600:.2f} h of trial training time in total")
        blocks.append(("ul", facts))
    if runs is None or runs.empty:
        blocks.append(("p", "No confirm runs were recorded."))
    else:
        seeds = runs.groupby("method")["seed"].nunique()
        text = (f"Confirm stage: {len(runs)} runs ({', '.join(f'{m}: {n} seeds' for m, n in seeds.items())})")
        if "train_seconds" in runs:
            text += f", {runs['train_seconds'].sum() / 3600:.2f} h of training"
        blocks.append(("p", text + "."))
    return blocks


def _corpus_blocks(runs: pd.DataFrame, order: list[str]) -> list[Block]:
    """Every test metric as papers print it: each run's corpus-level score, mean ± sd over its seeds."""
    table = corpus_scores(runs, order)
    if table.empty:
        return []
    header, rows = corpus_rows(table)
    return [("h2", "Test scores as papers report them"),
            ("p", "Each confirm run's corpus-level coco-caption scores on the test split (x100), mean ± standard "
                  "deviation over seeds: the numbers to set beside published tables. BLEU and METEOR pool their "
                  "statistics over the whole test set, so they have no per-image mean to bootstrap and appear "
                  "only here."),
            ("table", header, rows)]


def _anomaly_blocks(runs: pd.DataFrame) -> list[Block]:
    """Flag a method whose test captions do not depend on the image: (almost) one caption for every image in
    every seed, as an image-blind decoder writes. Its scores are a language model's, whatever its name."""
    if runs.empty or not {"distinct_captions", "test_images"} <= set(runs.columns):
        return []
    flagged = []
    for method, group in runs.groupby("method"):
        worst = int(group["distinct_captions"].max())
        if worst <= max(1, int(0.02 * group["test_images"].max())):
            flagged.append(f"{method}: at most {worst} distinct caption(s) for {int(group['test_images'].max())} "
                           f"test images in each of its {len(group)} runs: its captions do not depend on the image.")
    return [("h2", "Anomalies"), ("ul", flagged)] if flagged else []


def _seed_blocks(runs: pd.DataFrame, confirmed: pd.DataFrame | None, metric: str,
                 order: list[str] | None = None) -> list[Block]:
    """The confirmed configurations (search trial and hyperparameters) and every confirm run's test score."""
    blocks: list[Block] = []
    if confirmed is not None and not confirmed.empty:
        cols = [c for c in confirmed.columns if c not in ("method", "config_rank")]
        blocks += [("h2", "Confirmed configurations"),
                   ("p", "Each method's best search trials on validation, retrained in the confirm stage:"),
                   ("table", ["method", "rank", *cols],
                    [[r["method"], int(r["config_rank"]), *[_plain(r[c], c) for c in cols]]
                     for _, r in confirmed.iterrows()])]
    if not runs.empty and metric in runs:
        seeds = sorted(runs["seed"].unique())
        rows = []
        rank_of = {m: i for i, m in enumerate(order or [])}  # the registry's order, as every other table
        runs = runs.sort_values(["method", "config_rank"], key=lambda col: col.map(
            lambda v: (rank_of.get(v, len(rank_of)), str(v))) if col.name == "method" else col)
        for (method, rank), group in runs.groupby(["method", "config_rank"], sort=False):
            by_seed = group.set_index("seed")[metric]
            rows.append([method, int(rank), *[_x100(by_seed[s]) if s in by_seed else "-" for s in seeds]])
        blocks += [("p", f"Test {metric} (x100) of every confirm run, by seed:"),
                   ("table", ["method", "rank", *[f"seed {s}" for s in seeds]], rows)]
    return blocks


def _plain(value, column: str = "") -> str:
    """A table cell: a metric as the display rule prints it (``analysis.metric_table``), else the value."""
    if isinstance(value, float) and describe_metric(column) is not None:
        return format_metric(column, value)
    if isinstance(value, float):
        return "-" if value != value else f"{value:.4g}"  # NaN: a conditional parameter not sampled
    return "-" if value is None else str(value)


def _provenance_blocks(provenance: Mapping[str, str] | None) -> list[Block]:
    if not provenance:
        return []
    return [("h2", "Provenance"), ("table", ["what", "value"], [[k, str(v)] for k, v in provenance.items()])]


def _effects_blocks(effects: Effects, images: dict[str, Path | None]) -> list[Block]:
    blocks: list[Block] = [("h2", f"Hyperparameter effects (search, {effects.metric})")]
    if effects.n_trials == 0:
        return blocks + [("p", " ".join(effects.notes) or "No trials to analyse.")]
    if effects.importances:
        blocks += [("p", f"fANOVA importance over {effects.n_trials} trials (Optuna; share of the metric's "
                         f"variance each parameter explains, sums to 1):"),
                   ("table", ["parameter", "importance"],
                    [[p, f"{v:.3f}"] for p, v in effects.importances.items()])]
    blocks.append(("ul", list(effects.answers.values())))
    for param, table in effects.categorical.items():
        scale = 1.0 if lower_is_better(effects.metric) else 100.0
        blocks += [("h3", f"{param}"),
                   ("table", [param, "trials", "mean", "median", "best"],
                    [[str(v), int(r["count"]), f"{r['mean'] * scale:.1f}", f"{r['median'] * scale:.1f}",
                      f"{r['best'] * scale:.1f}"] for v, r in table.iterrows()])]
    if effects.edge_warnings:
        blocks += [("h3", "Edge warnings"), ("ul", [w.message for w in effects.edge_warnings])]
    else:
        blocks.append(("p", "No best trial sits within 10% of the end of a numeric range."))
    if effects.notes:
        blocks.append(("ul", effects.notes))
    for key, alt in (("params", "each varied hyperparameter vs the metric"),
                     ("curves", "learning curves of every trial")):
        if images.get(key) is not None:
            blocks.append(("img", images[key], alt))
    if images.get("curves") is None:
        blocks.append(("p", "No per-epoch history was recorded, so there are no learning curves."))
    return blocks


def _draw_figures(out_dir: Path, verdict: Verdict, trials: pd.DataFrame, history: pd.DataFrame, space: dict | None,
                  gallery: pd.DataFrame, metric: str, colors: Mapping[str, str],
                  margin: float) -> dict[str, Path | None]:
    """The report's figures, by name (None where there is nothing to draw)."""
    search_metric = f"val_{metric}"
    return {
        "methods": plots.plot_methods(verdict.table, metric, out_dir / "methods.png", colors=colors, margin=margin,
                                      level=verdict.level),
        "curves": plots.plot_learning_curves(history, trials, search_metric, out_dir / "learning_curves.png",
                                             colors=colors),
        "params": plots.plot_hyperparameters(trials, space, search_metric, out_dir / "hyperparameters.png",
                                             colors=colors),
        "gallery": plots.plot_gallery(gallery, out_dir / "gallery.png", colors=colors),
    }


@dataclass(frozen=True)
class ReportInputs:
    """What a report is written from: the search's trials and learning curves, the confirm runs with their
    per-image test scores, example captions, and what describes the study. A frame left out (None) is empty."""

    trials: pd.DataFrame | None = None
    history: pd.DataFrame | None = None
    per_image: pd.DataFrame | None = None
    runs: pd.DataFrame | None = None
    gallery: pd.DataFrame | None = None  # image_path, method, caption, reference
    confirmed: pd.DataFrame | None = None  # the trials the confirm stage retrained
    space: dict | None = None  # the searched parameters, as the spec describes them
    spec_text: str | None = None
    provenance: Mapping[str, str] | None = None
    resources: Mapping[str, float] | None = None  # what one trial held: {"cpu": 1.0, "gpu": 0.0}


@dataclass(frozen=True)
class VerdictSettings:
    """How the verdict compares the arms (``compute_verdict``'s settings): their roles and colours (see the module
    docstring), the margin, the confirm-stage metric (the search is analysed on ``val_<metric>``), the bootstrap,
    the intervals' level (a sequential plan's per-look level, ``analysis.sequential``), the fixed comparator and
    the test split's name."""

    roles: Mapping[str, str]
    colors: Mapping[str, str]
    margin: float
    metric: str = PRIMARY
    n_boot: int = 2000
    seed: int = 0
    level: float = 0.95
    comparator: str | None = None
    set_name: str = TEST_SET


def build_report(out_dir: Path, study_name: str, inputs: ReportInputs, settings: VerdictSettings, *,
                 decision: Callable[[Verdict], str | None] | None = None,
                 extra_blocks: list[Block] | None = None) -> ReportResult:
    """Compute the verdict and effects, draw the figures, write ``report.md`` + ``report.html`` in ``out_dir``.
    ``decision`` returns the report's line on how many seeds the verdict took or would take; ``extra_blocks``:
    more sections, after the test split's examples (the other photo collections the study was scored on and the
    pooled verdict, ``analysis.cross_dataset``; their figures already in ``out_dir``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = lambda f: f if f is not None else pd.DataFrame()  # noqa: E731
    trials, history = frame(inputs.trials), frame(inputs.history)
    per_image, runs = frame(inputs.per_image), frame(inputs.runs)
    metric, roles, space = settings.metric, settings.roles, inputs.space

    verdict = compute_verdict(per_image, runs, roles=roles, margin=settings.margin, metric=metric,
                              n_boot=settings.n_boot, seed=settings.seed, level=settings.level,
                              comparator=settings.comparator, set_name=settings.set_name)
    effects = compute_effects(trials, space, metric=f"val_{metric}", seed=settings.seed)
    figures = _draw_figures(out_dir, verdict, trials, history, space, frame(inputs.gallery), metric, settings.colors,
                            settings.margin)

    blocks: list[Block] = [("h1", f"Study report: {study_name}"), ("h2", "The question"), ("p", QUESTION)]
    blocks += _verdict_blocks(verdict, figures["methods"], decision(verdict) if decision else None)
    blocks += _corpus_blocks(runs, list(roles))
    blocks += _anomaly_blocks(runs)
    blocks += _seed_blocks(runs, inputs.confirmed, metric, order=list(roles))
    blocks += _effects_blocks(effects, figures)
    blocks.append(("h2", "Examples from the test split"))
    blocks.append(("img", figures["gallery"], "test images with each method's caption") if figures["gallery"]
                  else ("p", "No example captions were recorded."))
    blocks += extra_blocks or []
    blocks += [("h2", "Context: what the literature reached (not comparable numbers)"), ("p", LITERATURE_NOTE),
               ("table", ["data", "arch", "BLEU-4", "METEOR", "CIDEr"], [list(r) for r in LITERATURE])]
    blocks += _run_blocks(trials, history, runs)
    blocks += cost_blocks(trials, history, runs, inputs.resources or {"cpu": 1.0})
    blocks += _provenance_blocks(inputs.provenance)
    if inputs.spec_text:
        blocks += [("h2", "Appendix: the study spec"), ("code", inputs.spec_text)]

    md_path = out_dir / "report.md"
    md_path.write_text(to_markdown(blocks, out_dir))
    html_path = out_dir / "report.html"
    html_path.write_text(to_html(blocks, f"Study report: {study_name}"))
    images = [p for p in figures.values() if p is not None]
    return ReportResult(md_path, verdict, images, html_path, effects)
