"""The study's figures as PNG files (matplotlib, Agg backend: no display needed).

Every function takes the frames described in ``analysis.report``, writes one PNG to ``path`` and returns it,
or returns ``None`` when its input is empty (the report then says so instead of showing a figure).
Metric values come in on the 0..1 scale; axes show them x100 as the captioning literature does, except
losses and bits per character. One colour per injection method throughout, so figures read together: the
colours (``{method: "#rrggbb"}``, in display order) come in as data from the study's method registry, so a
newly registered method is drawn in its own colour without a change here.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: Ray workers and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from analysis.effects import NUMERIC_TYPES  # noqa: E402
from analysis.grouping import group_column  # noqa: E402
from analysis.metric_table import lower_is_better  # noqa: E402

DPI = 110


def method_color(method: str, colors: Mapping[str, str]) -> str | tuple[float, ...]:
    if method in colors:
        return colors[method]
    # A method without a registered colour (e.g. from an older study) still gets one that is the same in every
    # figure and every run.
    return plt.get_cmap("tab20")(sum(map(ord, method)) % 20)


def _scale(metric: str) -> float:
    return 1.0 if lower_is_better(metric) else 100.0


def _label(metric: str) -> str:
    return metric if lower_is_better(metric) else f"{metric} (x100)"


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _ordered(methods: Iterable[str], colors: Mapping[str, str]) -> list[str]:
    """Display order: the order of ``colors`` (the registry's), then any other method by name."""
    order = list(colors)
    return sorted(methods, key=lambda m: (order.index(m) if m in order else len(order), m))


def plot_methods(table: pd.DataFrame, metric: str, path: Path, *, colors: Mapping[str, str],
                 margin: float | None = None, level: float = 0.95) -> Path | None:
    """Bars: each method's confirmed mean with its bootstrap interval at ``level`` (the verdict's: 95%, or a
    sequential plan's per-look level after ``study decide``); a floor (``none``) hatched.

    ``table`` is ``Verdict.table`` (index method; columns ``role``, ``<metric>``, ``<metric>_lo``,
    ``<metric>_hi``, optionally ``params``). A dashed line marks the target's (init's) mean minus the margin:
    a method whose bar top is above it beats the target by more than the margin.
    """
    if table is None or table.empty or metric not in table or table[metric].isna().all():
        return None
    s = _scale(metric)
    methods = _ordered(table.index, colors)
    roles = table["role"] if "role" in table else pd.Series("", index=table.index)
    targets = [m for m in methods if roles[m] == "target"]
    mean = table.loc[methods, metric].to_numpy(float) * s
    lo = table.loc[methods, f"{metric}_lo"].to_numpy(float) * s
    hi = table.loc[methods, f"{metric}_hi"].to_numpy(float) * s
    fig, ax = plt.subplots(figsize=(1.3 * len(methods) + 2, 4))
    x = np.arange(len(methods))
    bars = ax.bar(x, mean, color=[method_color(m, colors) for m in methods], alpha=0.85,
                  yerr=np.vstack([mean - lo, hi - mean]), capsize=6, error_kw={"lw": 1.5})
    for bar, m in zip(bars, methods):
        if roles[m] == "floor":
            bar.set_hatch("//")
            bar.set_alpha(0.5)
    labels = []
    for m, v in zip(methods, mean):
        params = table.loc[m, "params"] if "params" in table else math.nan
        labels.append(f"{m}\n{params / 1e6:.2f} M" if not pd.isna(params) else m)
        ax.annotate(f"{v:.1f}", (methods.index(m), v), xytext=(6, 2), textcoords="offset points", fontsize=8)
    ax.set_xticks(x, labels)
    if margin is not None and targets and not lower_is_better(metric):
        target = targets[0]
        y = (table.loc[target, metric] - margin) * s
        ax.axhline(y, ls="--", color=method_color(target, colors), lw=1, label=f"{target} - margin ({margin * s:.1f})")
        ax.legend(loc="lower right", fontsize=8, framealpha=0.9)  # a label beside the line hid the last bar's value
    ax.set_ylabel(_label(metric))
    ax.set_title(f"Confirmed best configuration per arm: {metric}, mean and {100 * level:.4g}% CI "
                 f"(seeds x test images)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_learning_curves(history: pd.DataFrame, trials: pd.DataFrame | None, metric: str, path: Path, *,
                         colors: Mapping[str, str]) -> Path | None:
    """Every trial's validation curve coloured by method; an x at the last epoch of ASHA-stopped trials.

    ``history``: ``trial_id, inject, epoch, <metric>``; ``trials`` (optional): ``trial_id, status``.
    """
    if history is None or history.empty or metric not in history or history[metric].isna().all():
        return None
    status = {}
    if trials is not None and not trials.empty and "status" in trials:
        status = dict(zip(trials["trial_id"], trials["status"]))
    s = _scale(metric)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    by = group_column(history)
    methods = _ordered(history[by].dropna().unique(), colors) if by in history else []
    for trial_id, rows in history.sort_values("epoch").groupby("trial_id"):
        rows = rows[rows[metric].notna()]
        if rows.empty:
            continue
        method = rows[by].iloc[0] if by in rows else None
        color = method_color(method, colors) if method else "black"
        ax.plot(rows["epoch"], rows[metric] * s, color=color, alpha=0.55, lw=1.2)
        if status.get(trial_id) == "stopped":
            ax.plot(rows["epoch"].iloc[-1], rows[metric].iloc[-1] * s, "x", color=color, ms=7, mew=2)
        elif status.get(trial_id) == "errored":
            ax.plot(rows["epoch"].iloc[-1], rows[metric].iloc[-1] * s, "o", mfc="none", color=color, ms=7)
    handles = [Line2D([], [], color=method_color(m, colors), lw=2, label=m) for m in methods]
    handles.append(Line2D([], [], ls="", marker="x", color="black", mew=2, label="stopped by ASHA"))
    if "errored" in status.values():
        handles.append(Line2D([], [], ls="", marker="o", mfc="none", color="black", label="errored"))
    ax.legend(handles=handles, fontsize=8, ncol=2, loc="best")
    ax.set_xlabel("epoch")
    ax.set_ylabel(_label(metric))
    ax.set_title(f"Learning curves of all {history['trial_id'].nunique()} trials (validation)", fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _log_axis(ax, low: float, high: float) -> None:
    """A log x axis over [low, high] with labels at 1, 2 and 5 per decade (each decade only, past two) as plain
    numbers: matplotlib's default labels every minor tick of a one-decade range (3x10^-3 4x10^-3 ...), and they
    overlap."""
    ax.set_xscale("log")
    ax.set_xlim(low / 1.15, high * 1.15)
    subs = (1.0, 2.0, 5.0) if math.log10(high / low) <= 2 else (1.0,)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=6))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _panel_x(ax, desc: dict, values: pd.Series, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A panel's x positions and axis: a numeric parameter over its searched range (log for loguniform), so points
    bunched at an edge are visible as such; a choice as jittered strips, with each value's mean as a short bar."""
    if desc.get("type") in NUMERIC_TYPES:
        low, high = float(desc["low"]), float(desc["high"])
        if desc["type"] == "loguniform":
            _log_axis(ax, low, high)
        else:
            pad = 0.03 * (high - low)
            ax.set_xlim(low - pad, high + pad)
        return values.to_numpy(float)
    order = [v for v in desc.get("values", []) if v in set(values.dropna())]
    order += sorted(set(values.dropna()) - set(order), key=str)
    index = {v: i for i, v in enumerate(order)}
    x = np.array([index.get(v, np.nan) for v in values], float) + rng.uniform(-0.15, 0.15, len(values))
    ax.set_xticks(range(len(order)), [str(v) for v in order], rotation=20 if len(order) > 3 else 0)
    for i, v in enumerate(order):  # the per-value mean as a short bar
        ax.hlines(y[(values == v).to_numpy()].mean(), i - 0.3, i + 0.3, color="black", lw=2)
    return x


def plot_hyperparameters(trials: pd.DataFrame, space: dict[str, dict] | None, metric: str, path: Path, *,
                         colors: Mapping[str, str]) -> Path | None:
    """One panel per varied parameter: metric vs value (scatter, log x for loguniform; strips for choices).

    Points are coloured by method; stopped trials are hollow (their value is from fewer epochs).
    """
    if trials is None or trials.empty or metric not in trials:
        return None
    rows = trials[np.isfinite(trials[metric].astype(float))]
    params = [p for p in (space or {}) if p in rows and rows[p].dropna().nunique() > 1]
    if rows.empty or not params:
        return None
    s = _scale(metric)
    cols = min(3, len(params))
    nrows = math.ceil(len(params) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    rng = np.random.default_rng(0)  # jitter only; fixed so the figure is reproducible
    by = group_column(rows)
    point_colors = [method_color(m, colors) for m in rows[by]] if by in rows else ["black"] * len(rows)
    stopped = (rows["status"] == "stopped").to_numpy() if "status" in rows else np.zeros(len(rows), bool)
    y = rows[metric].to_numpy(float) * s
    for ax, p in zip(axes.flat, params):
        values = rows[p]
        present = values.notna().to_numpy()
        x = _panel_x(ax, space[p], values, y, rng)
        for hollow in (False, True):
            sel = present & (stopped == hollow)
            c = [point_colors[i] for i in np.flatnonzero(sel)]
            ax.scatter(x[sel], y[sel], s=22, facecolors="none" if hollow else c, edgecolors=c, linewidths=1.2)
        ax.set_xlabel(p)
        ax.set_ylabel(_label(metric))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(params):]:
        ax.axis("off")
    methods = _ordered(rows[by].dropna().unique(), colors) if by in rows else []
    handles = [Line2D([], [], ls="", marker="o", color=method_color(m, colors), label=m) for m in methods]
    handles.append(Line2D([], [], ls="", marker="o", mfc="none", color="black", label="stopped by ASHA"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, bbox_to_anchor=(0.5, 1.0))
    fig.suptitle(f"Each varied hyperparameter vs {metric} ({len(rows)} trials, best epoch)", y=1.05, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_gallery(gallery: pd.DataFrame, path: Path, *, colors: Mapping[str, str],
                 max_images: int = 6) -> Path | None:
    """A grid: each test image beside the caption every method's best model wrote and one reference.

    ``gallery``: ``image_path, method, caption, reference``. Images that cannot be opened are drawn as a
    grey box with the path, so one missing file does not lose the figure.
    """
    from PIL import Image

    if gallery is None or gallery.empty:
        return None
    images = list(dict.fromkeys(gallery["image_path"]))[:max_images]
    fig, axes = plt.subplots(len(images), 2, figsize=(11, 2.6 * len(images)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.2]})
    for (ax_img, ax_txt), image_path in zip(axes, images):
        rows = gallery[gallery["image_path"] == image_path]
        try:
            with Image.open(image_path) as im:
                im = im.convert("RGB")
                im.thumbnail((320, 320))
                ax_img.imshow(np.asarray(im))
        except OSError:
            ax_img.set_facecolor("#dddddd")
            ax_img.text(0.5, 0.5, "image not found", ha="center", va="center", fontsize=8)
        ax_img.set_title(Path(str(image_path)).name, fontsize=8)
        ax_img.axis("off")
        ax_txt.axis("off")
        lines = []
        for method in _ordered(rows["method"].unique(), colors):
            caption = rows.loc[rows["method"] == method, "caption"].iloc[0]
            lines.append((method, textwrap.shorten(str(caption), 95)))
        reference = rows["reference"].dropna()
        if len(reference):
            lines.append(("reference", textwrap.shorten(str(reference.iloc[0]), 95)))
        for i, (who, text) in enumerate(lines):
            y = 1 - (i + 0.5) / max(len(lines), 1)
            color = method_color(who, colors) if who != "reference" else "black"
            ax_txt.text(0.0, y, f"{who}:", color=color, fontsize=9, fontweight="bold", va="center",
                        transform=ax_txt.transAxes)
            ax_txt.text(0.16, y, text, fontsize=9, va="center", transform=ax_txt.transAxes,
                        style="italic" if who == "reference" else "normal")
    fig.suptitle("Test images and the caption each method's best model wrote", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_confirm_curves(curves: pd.DataFrame, path: Path, metric: str = "val_CIDEr-D",
                        colors: Mapping[str, str] | None = None) -> Path | None:
    """The seed-mean validation curve of each confirm configuration, with the seeds' range shaded."""
    if curves.empty or metric not in curves:
        return None
    colors = colors or {}
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for method in _ordered(curves["method"].unique(), colors):
        for rank, runs in curves[curves["method"] == method].groupby("config_rank"):
            by_epoch = runs.groupby("epoch")[metric]
            mean, low, high = by_epoch.mean() * 100, by_epoch.min() * 100, by_epoch.max() * 100
            color = method_color(method, colors)
            ax.plot(mean.index, mean.values, marker="o", ms=3, color=color,
                    label=method if rank == 1 else f"{method} (rank {rank})", ls="-" if rank == 1 else "--")
            ax.fill_between(mean.index, low.values, high.values, color=color, alpha=0.15, lw=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (x100), mean of seeds")
    ax.set_title("Confirm runs: validation curves (shaded: the seeds' range)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)
