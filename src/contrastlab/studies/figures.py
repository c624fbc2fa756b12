"""Figures of a study table: a bar chart of each metric and the kNN curves of every cell.

``--figure PATH`` (``contrastlab table``, ``contrastlab study table``) writes two files:

- ``PATH``: one panel per accuracy metric of the table, one bar per group (one per published row when a group
  reproduces several rows of that metric) at the mean over its done cells, the error bar one sample standard
  deviation, ``n`` written at the bar's foot; the published value is a red line across the bar, with a pale red
  band of plus and minus the published standard deviation where the paper gives one. The value axis starts at a round number
  below the lowest value, not at 0, so that differences of a point show.
- ``<PATH stem>_curves<PATH suffix>``: the kNN top-1 after every epoch of every cell (``metrics.jsonl``), one
  colour per group; cells that are not done (failed, interrupted, running) are dashed.

The data each figure draws comes from :func:`bar_data` and :func:`curve_data`, which tests check; the suffix of
``PATH`` picks the format (``.png``, ``.pdf``, ``.svg``; none: ``.png``).
"""

from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

from contrastlab.errors import ContrastlabError
from contrastlab.studies.table import LABELS, Table

#: Metrics drawn as bars (the training-loop time is left out: it is not an accuracy).
BAR_METRICS = ("knn_top1", "linear_top1", "finetune_top1", "test_top1", "test_top1_peer_mean", "test_top1_ensemble")


@dataclass(frozen=True)
class Bar:
    """One bar: a group's mean, std and n of a metric, and the published value it is compared with."""

    label: str
    mean: float
    std: float | None
    n: int
    published: float | None = None
    published_std: float | None = None


@dataclass(frozen=True)
class BarPanel:
    """The bars of one metric."""

    metric: str
    bars: tuple[Bar, ...]


@dataclass(frozen=True)
class Curve:
    """One cell's kNN top-1 after each epoch."""

    group: str
    seed: int
    state: str
    epochs: tuple[int, ...]
    values: tuple[float, ...]


def bar_data(table: Table) -> list[BarPanel]:
    """One panel per accuracy metric the table holds; one bar per group with a value (per published row of that
    metric when the group has several)."""
    panels = []
    for metric in (m for m in table.metrics if m in BAR_METRICS):
        bars = []
        for group in table.groups:
            agg = group.metrics.get(metric)
            if agg is None:
                continue
            rows = [c for c in group.comparisons if c.metric == metric]
            if not rows:
                bars.append(Bar(group.name, agg.mean, agg.std, agg.n))
            for c in rows:
                label = group.name if len(rows) == 1 else f"{group.name}\n({c.row_id})"
                bars.append(Bar(label, agg.mean, agg.std, agg.n, c.value, c.std))
        panels.append(BarPanel(metric, tuple(bars)))
    return panels


def curve_data(table: Table) -> list[Curve]:
    """Every cell's kNN curve (cells whose directory holds none are left out), in table order."""
    curves = []
    for group in table.groups:
        for cell, result in zip(group.cells, group.results):
            if result is not None and result.knn_curve:
                epochs, values = zip(*result.knn_curve)
                curves.append(Curve(group.name, cell.seed, cell.state, tuple(epochs), tuple(values)))
    return curves


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_bars(panels: list[BarPanel], path: str | os.PathLike, columns: int = 3) -> Path:
    """Write the bar chart of :func:`bar_data`'s panels to ``path`` (up to ``columns`` panels a row)."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    cols = min(columns, len(panels))
    rows = math.ceil(len(panels) / cols)
    width = max(3.6, 0.9 * max(len(p.bars) for p in panels) + 1.6)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 4.4 * rows), dpi=120, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        xs = list(range(len(panel.bars)))
        ax.bar(xs, [b.mean for b in panel.bars], yerr=[b.std or 0.0 for b in panel.bars], capsize=4,
               color="tab:blue", alpha=0.8, label="ours: mean ± std over done cells")
        for x, b in zip(xs, panel.bars):
            if b.published is None:
                continue
            ax.hlines(b.published, x - 0.42, x + 0.42, color="tab:red", linewidth=2.5, zorder=3, label="published")
            if b.published_std:
                ax.add_patch(Rectangle((x - 0.42, b.published - b.published_std), 0.84, 2 * b.published_std,
                                       color="tab:red", alpha=0.25, linewidth=0, zorder=2,
                                       label="published ± its std"))
        lows = [b.mean - (b.std or 0.0) for b in panel.bars]
        lows += [b.published - (b.published_std or 0.0) for b in panel.bars if b.published is not None]
        highs = [b.mean + (b.std or 0.0) for b in panel.bars]
        highs += [b.published + (b.published_std or 0.0) for b in panel.bars if b.published is not None]
        bottom = max(0.0, 5.0 * math.floor((min(lows) - 5.0) / 5.0))
        ax.set_ylim(bottom, max(highs) + 0.08 * (max(highs) - bottom) + 0.5)
        for x, b in zip(xs, panel.bars):
            ax.annotate(f"n={b.n}", (x, bottom), ha="center", va="bottom", xytext=(0, 3), textcoords="offset points",
                        fontsize="small", color="white")
        ax.set_xticks(xs, ["\n".join(textwrap.wrap(b.label, 20)) for b in panel.bars], rotation=30, ha="right",
                      fontsize="x-small")
        ax.set_ylabel(f"{LABELS.get(panel.metric, panel.metric)} (%)")
        ax.grid(axis="y", alpha=0.3)
    legend: dict[str, object] = {}  # label -> handle, over every panel (some panels have no published value)
    for ax in axes.flat[:len(panels)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="upper center", ncol=3, fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def draw_curves(curves: list[Curve], path: str | os.PathLike) -> Path:
    """Write every cell's kNN curve to ``path``, one colour per group, cells that are not done dashed."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    colours: dict[str, str] = {}
    for curve in curves:
        first = curve.group not in colours
        colour = colours.setdefault(curve.group, f"C{len(colours) % 10}")
        ax.plot(curve.epochs, curve.values, color=colour, linestyle="-" if curve.state == "done" else "--",
                marker="o" if len(curve.epochs) < 30 else None, markersize=3, alpha=0.85,
                label=curve.group if first else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 (%)")
    ax.set_title("kNN top-1 after each epoch, one line per cell (dashed: not done)", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def curves_path(path: str | os.PathLike) -> Path:
    """The curve figure beside ``path``: ``<stem>_curves<suffix>``."""
    path = Path(path)
    suffix = path.suffix or ".png"
    return path.with_name(f"{path.stem if path.suffix else path.name}_curves{suffix}")


def write_figures(table: Table, path: str | os.PathLike) -> list[Path]:
    """Write the bar chart to ``path`` and the kNN curves to :func:`curves_path`; returns the files written.

    Raises:
        ContrastlabError: the table holds no accuracy and no kNN curve to draw.
    """
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    panels, curves = [p for p in bar_data(table) if p.bars], curve_data(table)
    if not panels and not curves:
        raise ContrastlabError(f"nothing to draw in {path}: no group has a done cell with an accuracy, and no "
                               "cell has a kNN curve in its metrics.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if panels:
        written.append(draw_bars(panels, path))
    if curves:
        written.append(draw_curves(curves, curves_path(path)))
    return written
