"""Figures of the pos/neg score distributions recorded by :class:`~contrastlab.observers.ScoreStatistics`.

The visualisation of Zhu, Zhao, Liu, Sun, Chen, "Improving Contrastive Learning by Visualizing Feature
Transformation", ICCV 2021 (arXiv 2108.02982), section 3 and its released notebook: per-iteration curves
of the positive mean, negative mean and negative variance with several runs overlaid (its published use
is a sweep of MoCo's momentum), the same as a 3-D "waterfall" with one line per run, and the score
distributions drawn as Gaussians of the recorded mean and variance. Added here: the recorded coarse
histograms under those Gaussians, the hardness measures, and before-vs-after-FT comparisons.

Every function writes a PNG and a PDF and returns their paths; runs are labelled by the caller
(``ScoreRun.label``, e.g. ``"m=0.99"``). Files of several ranks are merged: per step, the means and
variances over each rank's anchors are pooled into those over all anchors, and histograms are summed.

Command line (the ``contrastlab`` CLI wires the same arguments)::

    python -m contrastlab.viz.score_plots runs/m0999 runs/m099 --label m=0.999 --label m=0.99 --out figs

Example:
    >>> runs = [load_scores("runs/m0999", "m=0.999"), load_scores("runs/m099", "m=0.99")]  # doctest: +SKIP
    >>> plot_time_series(runs, "figs")  # doctest: +SKIP
    [PosixPath('figs/score_time_series_ft.png'), PosixPath('figs/score_time_series_ft.pdf')]
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from contrastlab.observers.score_statistics import FIELDS, VARIANTS, read_score_file

__all__ = [
    "SERIES",
    "ScoreRun",
    "add_arguments",
    "load_scores",
    "main",
    "plot_before_after",
    "plot_epoch_histograms",
    "plot_scores",
    "plot_time_series",
    "plot_waterfall",
]

#: plottable per-step series: name -> (field, reduction over the anchors, axis label)
SERIES: dict[str, tuple[str, str, str]] = {
    "pos_mean": ("pos", "mean", "positive score, batch mean"),
    "pos_var": ("pos", "var", "positive score, batch variance"),
    "neg_mean": ("neg_mean", "mean", "negative score mean"),
    "neg_var": ("neg_var", "mean", "negative score variance"),
    "exp_pos": ("exp_pos", "mean", "exp(pos / tau), batch mean"),
    "exp_neg_mean": ("exp_neg_mean", "mean", "mean exp(neg / tau)"),
    "neg_max": ("neg_max", "mean", "hardest negative score"),
    "n_above": ("n_above", "mean", "negatives above the positive"),
}
DEFAULT_SERIES = ("pos_mean", "neg_mean", "neg_var")
_FILE = re.compile(r"epoch_(\d+)\.rank(\d+)\.npz$")
_VARIANT_NAMES = {"raw": "before FT", "ft": "after FT"}


def _variant_name(runs: Sequence[ScoreRun], variant: str) -> str:
    """How a legend names the variant: "before FT" / "after FT", or "no FT" when no run used FT."""
    if not any(bool(np.any(run.transformed)) for run in runs):
        return "no FT"
    return _VARIANT_NAMES[variant]


@dataclass
class ScoreRun:
    """The recorded statistics of one run, all epochs, ranks merged.

    Attributes:
        label: the run's name in legends (its setting, e.g. ``"m=0.99"``).
        steps: global step of each record ``[S]``.
        epochs: epoch of each record ``[S]``.
        summary: ``[S, V, F, 2]``: variant (``raw``, ``ft``), field, (mean, population variance) over
            the anchors of all ranks.
        transformed: ``[S]``, whether FT was configured at that step.
        hist_edges: ``[bins + 1]`` in score units.
        hist_pos: epoch -> ``[V, bins + 2]`` counts (first and last columns: below / above the range).
        hist_neg: the same for negatives.
        ranks: the ranks whose files were merged.
    """

    label: str
    steps: np.ndarray
    epochs: np.ndarray
    summary: np.ndarray
    transformed: np.ndarray
    hist_edges: np.ndarray
    hist_pos: dict[int, np.ndarray] = field(default_factory=dict)
    hist_neg: dict[int, np.ndarray] = field(default_factory=dict)
    ranks: list[int] = field(default_factory=list)

    def series(self, name: str, variant: str = "ft") -> np.ndarray:
        """The per-step values ``[S]`` of one :data:`SERIES` entry for one variant."""
        if name not in SERIES:
            raise ValueError(f"unknown score series {name!r}; valid: {', '.join(SERIES)}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
        fld, reduction, _ = SERIES[name]
        return self.summary[:, VARIANTS.index(variant), FIELDS.index(fld), 0 if reduction == "mean" else 1]

    @property
    def epoch_numbers(self) -> list[int]:
        """The epochs present, in order."""
        return sorted(int(e) for e in np.unique(self.epochs))

    def moments(self, epoch: int, variant: str = "ft") -> dict[str, tuple[float, float]]:
        """Mean and variance of the positive and of the negative scores over one epoch.

        Pooled from the per-step records by the law of total variance: for positives,
        ``var = E_steps[var over anchors] + Var_steps[mean]``; for negatives, the per-anchor variance
        ``neg_var`` adds a level: ``var = E[neg_var] + E[var over anchors of neg_mean] + Var_steps[...]``.
        """
        rows = self.epochs == epoch
        if not rows.any():
            raise ValueError(
                f"run {self.label!r} has no records of epoch {epoch}; epochs: {self.epoch_numbers}"
            )
        s = self.summary[rows, VARIANTS.index(variant)]
        pos_m, pos_v = s[:, FIELDS.index("pos"), 0], s[:, FIELDS.index("pos"), 1]
        nm_m, nm_v = s[:, FIELDS.index("neg_mean"), 0], s[:, FIELDS.index("neg_mean"), 1]
        nv_m = s[:, FIELDS.index("neg_var"), 0]
        return {
            "pos": (float(pos_m.mean()), float(pos_v.mean() + pos_m.var())),
            "neg": (float(nm_m.mean()), float(np.nanmean(nv_m) + nm_v.mean() + nm_m.var())),
        }


def _score_folder(path: Path) -> Path:
    return path / "scores" if (path / "scores").is_dir() else path


def _merge_ranks(parts: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pool the per-rank (mean, var) over anchors into the (mean, var) over all anchors; sum histograms."""
    weights = np.stack([p["anchors"] for p in parts]).astype(np.float64)  # [R, S]
    summaries = np.stack([p["summary"] for p in parts])  # [R, S, V, F, 2]
    w = weights[:, :, None, None] / weights.sum(axis=0)[None, :, None, None]
    mean = (w * summaries[..., 0]).sum(axis=0)
    second = (w * (summaries[..., 1] + summaries[..., 0] ** 2)).sum(axis=0)
    var = np.maximum(second - mean**2, 0.0)
    hist_pos = sum(p["hist_pos"] for p in parts)
    hist_neg = sum(p["hist_neg"] for p in parts)
    return np.stack([mean, var], axis=-1), hist_pos, hist_neg


def load_scores(
    path: str | os.PathLike, label: str | None = None, ranks: Sequence[int] | None = None
) -> ScoreRun:
    """Read every ``epoch_*.rank*.npz`` of a run directory (or of its ``scores`` folder).

    Args:
        path: the run directory (holding ``scores/``) or the scores folder itself.
        label: the legend label (default: the run directory's name).
        ranks: which ranks to merge (default: every rank found).

    Raises:
        FileNotFoundError: no score file is there.
        ValueError: the ranks of an epoch recorded different steps.
    """
    path = Path(path)
    folder = _score_folder(path)
    files: dict[int, dict[int, Path]] = {}
    for f in sorted(folder.glob("epoch_*.rank*.npz")):
        m = _FILE.search(f.name)
        if m and (ranks is None or int(m.group(2)) in ranks):
            files.setdefault(int(m.group(1)), {})[int(m.group(2))] = f
    if not files:
        raise FileNotFoundError(
            f"no score statistics files (epoch_*.rank*.npz) in {folder}; train with the "
            "score-statistics observer on, or pass the run directory that holds scores/"
        )
    steps, epochs, summaries, transformed = [], [], [], []
    hist_pos, hist_neg = {}, {}
    edges = None
    used_ranks: set[int] = set()
    for epoch in sorted(files):
        epoch_ranks = sorted(files[epoch])
        parts = [read_score_file(files[epoch][r]) for r in epoch_ranks]
        for p, r in zip(parts[1:], epoch_ranks[1:]):
            if not np.array_equal(p["steps"], parts[0]["steps"]):
                raise ValueError(
                    f"epoch {epoch}: rank {r} recorded other steps than rank {epoch_ranks[0]} in {folder}"
                )
        summary, hp, hn = _merge_ranks(parts)
        steps.append(parts[0]["steps"])
        epochs.append(np.full(len(parts[0]["steps"]), epoch))
        summaries.append(summary)
        transformed.append(parts[0]["transformed"])
        hist_pos[epoch], hist_neg[epoch] = hp, hn
        edges = parts[0]["hist_edges"]
        used_ranks.update(files[epoch])
    return ScoreRun(
        label=label if label is not None else (path.name if folder != path else path.parent.name),
        steps=np.concatenate(steps),
        epochs=np.concatenate(epochs),
        summary=np.concatenate(summaries),
        transformed=np.concatenate(transformed),
        hist_edges=np.asarray(edges),
        hist_pos=hist_pos,
        hist_neg=hist_neg,
        ranks=sorted(used_ranks),
    )


# ---------------------------------------------------------------------------------------------- drawing
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: str | os.PathLike, name: str, tight_bbox: bool = False) -> list[Path]:
    """Write ``name.png`` and ``name.pdf``; 2-D figures are laid out by ``tight_layout`` beforehand, 3-D ones
    need ``tight_bbox`` (an extra layout pass per file) to keep their axis labels."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = out / f"{name}.{ext}"
        fig.savefig(path, dpi=150, bbox_inches="tight" if tight_bbox else None)
        paths.append(path)
    _pyplot().close(fig)
    return paths


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` steps (1: unchanged), shortened at the start."""
    if window <= 1 or len(values) == 0:
        return values
    kernel = np.ones(min(window, len(values)))
    num = np.convolve(np.nan_to_num(values), kernel)[: len(values)]
    den = np.convolve(np.ones(len(values)), kernel)[: len(values)]
    return num / den


def _iteration_axis(ax, label: str = "training iteration") -> None:
    from matplotlib.ticker import EngFormatter

    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)


def _as_runs(runs: ScoreRun | Sequence[ScoreRun]) -> list[ScoreRun]:
    out = [runs] if isinstance(runs, ScoreRun) else list(runs)
    if not out:
        raise ValueError("no runs to plot")
    return out


def plot_time_series(
    runs: ScoreRun | Sequence[ScoreRun],
    out_dir: str | os.PathLike,
    series: Sequence[str] = DEFAULT_SERIES,
    variant: str = "ft",
    smooth: int = 1,
    name: str | None = None,
) -> list[Path]:
    """Per-iteration curves, one panel per series, every run overlaid (the paper's 2-D figure).

    Args:
        runs: the runs, each drawn in its own colour and named by its label.
        out_dir: output folder.
        series: names from :data:`SERIES` (default: positive mean, negative mean, negative variance).
        variant: ``"ft"`` (scores the loss saw) or ``"raw"`` (before FT).
        smooth: trailing moving-average window in steps.
        name: file stem (default ``score_time_series_<variant>``).
    """
    plt = _pyplot()
    runs = _as_runs(runs)
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.4), squeeze=False)
    for ax, key in zip(axes[0], series):
        for run in runs:
            ax.plot(run.steps, _smooth(run.series(key, variant), smooth), label=run.label, linewidth=1.0)
        ax.set_title(SERIES[key][2])
        _iteration_axis(ax)
    axes[0][-1].legend(loc="best", fontsize=8, title=_variant_name(runs, variant), title_fontsize=8)
    fig.tight_layout()
    return _save(fig, out_dir, name or f"score_time_series_{variant}")


def plot_waterfall(
    runs: ScoreRun | Sequence[ScoreRun],
    out_dir: str | os.PathLike,
    series: str = "neg_var",
    variant: str = "ft",
    smooth: int = 1,
    name: str | None = None,
) -> list[Path]:
    """3-D waterfall of one series: runs side by side along one axis, iterations along another.

    Args:
        runs: the runs, in the order they are placed (e.g. decreasing momentum).
        out_dir: output folder.
        series: a name from :data:`SERIES`.
        variant: ``"ft"`` or ``"raw"``.
        smooth: trailing moving-average window in steps.
        name: file stem (default ``score_waterfall_<series>_<variant>``).
    """
    plt = _pyplot()
    runs = _as_runs(runs)
    fig = plt.figure(figsize=(8, 6.5))
    ax = fig.add_subplot(projection="3d")
    for i, run in enumerate(runs):
        ax.plot(
            np.full(len(run.steps), float(i)),
            run.steps,
            _smooth(run.series(series, variant), smooth),
            linewidth=1.0,
            label=run.label,
        )
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels([run.label for run in runs], fontsize=8)
    ax.set_xlabel("run", labelpad=10)
    ax.set_ylabel("training iteration", labelpad=10)
    ax.set_zlabel(SERIES[series][2], labelpad=10)
    ax.set_title(f"{SERIES[series][2]} ({_variant_name(runs, variant)})")
    ax.view_init(elev=25, azim=-60)
    return _save(fig, out_dir, name or f"score_waterfall_{series}_{variant}", tight_bbox=True)


def _pick_epochs(run: ScoreRun, epochs: Sequence[int] | None, count: int) -> list[int]:
    available = [e for e in run.epoch_numbers if e in run.hist_pos]
    if epochs is not None:
        missing = [e for e in epochs if e not in available]
        if missing:
            raise ValueError(
                f"run {run.label!r} has no histograms of epochs {missing}; available: {available}"
            )
        return list(epochs)
    if len(available) <= count:
        return available
    idx = np.linspace(0, len(available) - 1, count).round().astype(int)
    return [available[i] for i in sorted(set(idx))]


def _draw_distribution(ax, run: ScoreRun, epoch: int, variant: str, style: str = "-", tag: str = "") -> None:
    """Histograms (as densities) of pos and neg scores with the Gaussians of the recorded moments."""
    edges = run.hist_edges
    width = np.diff(edges)
    v = VARIANTS.index(variant)
    moments = run.moments(epoch, variant)
    lo, hi = edges[0], edges[-1]
    xs = np.linspace(lo, hi, 400)
    for kind, counts, colour in (
        ("pos", run.hist_pos[epoch][v], "tab:red"),
        ("neg", run.hist_neg[epoch][v], "tab:blue"),
    ):
        total = counts.sum()
        if total <= 0:
            continue
        density = counts[1:-1] / (total * width)
        outside = (counts[0] + counts[-1]) / total
        extra = f", {100 * outside:.1f}% outside" if outside > 0 else ""
        ax.stairs(
            density,
            edges,
            color=colour,
            alpha=0.35 if style == "-" else 0.6,
            fill=style == "-",
            linestyle=style,
            label=f"{kind}{tag} histogram{extra}",
        )
        mean, var = moments[kind]
        if var > 0 and math.isfinite(var):
            gauss = np.exp(-0.5 * (xs - mean) ** 2 / var) / math.sqrt(2 * math.pi * var)
            ax.plot(
                xs,
                gauss,
                color=colour,
                linestyle=style,
                linewidth=1.2,
                label=f"{kind}{tag} N({mean:.2f}, {math.sqrt(var):.2f}²)",
            )
    ax.set_xlim(lo, hi)
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)


def plot_epoch_histograms(
    run: ScoreRun,
    out_dir: str | os.PathLike,
    epochs: Sequence[int] | None = None,
    variant: str = "ft",
    count: int = 6,
    name: str | None = None,
) -> list[Path]:
    """Per-epoch snapshots of the pos/neg score distributions: histograms and recorded Gaussians.

    Args:
        run: one run.
        out_dir: output folder.
        epochs: which epochs (default: ``count`` of them, evenly spread).
        variant: ``"ft"`` or ``"raw"``.
        count: number of panels when ``epochs`` is not given.
        name: file stem (default ``score_histograms_<variant>``).
    """
    plt = _pyplot()
    chosen = _pick_epochs(run, epochs, count)
    columns = min(3, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.3 * columns, 3.3 * rows), squeeze=False)
    for ax, epoch in zip(axes.flat, chosen):
        _draw_distribution(ax, run, epoch, variant)
        ax.set_title(f"{run.label}: epoch {epoch} ({_variant_name([run], variant)})", fontsize=9)
        ax.legend(loc="upper left", fontsize=6)
    for ax in list(axes.flat)[len(chosen) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, out_dir, name or f"score_histograms_{variant}")


def plot_before_after(
    run: ScoreRun,
    out_dir: str | os.PathLike,
    series: Sequence[str] = DEFAULT_SERIES,
    epoch: int | None = None,
    smooth: int = 1,
    name: str | None = None,
) -> list[Path]:
    """Scores before vs after FT: the series of both variants, and both distributions at ``epoch``.

    Args:
        run: one run (trained with FT; without it both variants coincide, which the title says).
        out_dir: output folder.
        series: names from :data:`SERIES` for the top row.
        epoch: epoch of the distribution panel (default: the last one).
        smooth: trailing moving-average window in steps.
        name: file stem (default ``score_before_after``).
    """
    plt = _pyplot()
    epoch = run.epoch_numbers[-1] if epoch is None else epoch
    fig, axes = plt.subplots(2, len(series), figsize=(4.2 * len(series), 6.6), squeeze=False)
    for ax, key in zip(axes[0], series):
        for variant, style in (("raw", "--"), ("ft", "-")):
            ax.plot(
                run.steps,
                _smooth(run.series(key, variant), smooth),
                linestyle=style,
                linewidth=1.0,
                label=_VARIANT_NAMES[variant],
            )
        ax.set_title(SERIES[key][2], fontsize=10)
        _iteration_axis(ax)
    axes[0][0].legend(loc="best", fontsize=8)
    dist_ax = axes[1][0]
    _draw_distribution(dist_ax, run, epoch, "raw", style="--", tag=" (before)")
    _draw_distribution(dist_ax, run, epoch, "ft", style="-", tag=" (after)")
    dist_ax.set_title(f"epoch {epoch}", fontsize=10)
    dist_ax.legend(loc="upper left", fontsize=6)
    if len(series) > 1:  # the hardness measures before and after, per iteration
        for ax, key in zip(axes[1][1:], ("neg_max", "n_above")):
            for variant, style in (("raw", "--"), ("ft", "-")):
                ax.plot(
                    run.steps,
                    _smooth(run.series(key, variant), smooth),
                    linestyle=style,
                    linewidth=1.0,
                    label=_VARIANT_NAMES[variant],
                )
            ax.set_title(SERIES[key][2], fontsize=10)
            _iteration_axis(ax)
        for ax in axes[1][3:]:
            ax.set_visible(False)
    note = "" if run.transformed.any() else " (FT was off: the two coincide)"
    fig.suptitle(f"{run.label}: before vs after Feature Transformation{note}", fontsize=11)
    fig.tight_layout()
    return _save(fig, out_dir, name or "score_before_after")


def plot_scores(
    runs: Sequence[ScoreRun],
    out_dir: str | os.PathLike,
    variant: str = "ft",
    smooth: int = 1,
    epochs: Sequence[int] | None = None,
    series: Sequence[str] = DEFAULT_SERIES,
) -> list[Path]:
    """Every figure: time series and one waterfall per series over all runs; per run, its histogram
    snapshots (``<label>_`` prefixed) and, when FT was on, its before-vs-after figure."""
    runs = _as_runs(runs)
    written = plot_time_series(runs, out_dir, series, variant, smooth)
    for key in series:
        written += plot_waterfall(runs, out_dir, key, variant, smooth)
    for run in runs:
        stem = re.sub(r"[^A-Za-z0-9._=-]+", "_", run.label)
        written += plot_epoch_histograms(
            run, out_dir, epochs, variant, name=f"{stem}_score_histograms_{variant}"
        )
        if run.transformed.any():
            written += plot_before_after(
                run, out_dir, series, smooth=smooth, name=f"{stem}_score_before_after"
            )
    return written


# ------------------------------------------------------------------------------------------ command line
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The score-plot arguments (``runs``, ``--label``, ``--out``, ``--variant``, ``--smooth``,
    ``--epochs``, ``--series``, ``--ranks``), for this module's ``main`` and the ``contrastlab`` CLI."""
    parser.add_argument("runs", nargs="+", help="run directories (holding scores/) or score folders")
    parser.add_argument(
        "--label",
        action="append",
        default=None,
        help="legend label of each run, in order (default: directory names); repeat per run",
    )
    parser.add_argument("--out", default=None, help="output folder (default: <first run>/plots/scores)")
    parser.add_argument(
        "--variant",
        choices=list(VARIANTS),
        default="ft",
        help="ft: scores the loss saw (after FT); raw: before FT",
    )
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window in iterations")
    parser.add_argument(
        "--epochs", type=int, nargs="*", default=None, help="epochs of the histogram snapshots"
    )
    parser.add_argument(
        "--series",
        nargs="*",
        default=list(DEFAULT_SERIES),
        choices=list(SERIES),
        help="series of the time-series and waterfall figures",
    )
    parser.add_argument("--ranks", type=int, nargs="*", default=None, help="ranks to merge (default: all)")
    return parser


def run_from_args(args: argparse.Namespace) -> list[Path]:
    """Load the runs named by parsed :func:`add_arguments` arguments and draw every figure."""
    labels = args.label or []
    if labels and len(labels) != len(args.runs):
        raise ValueError(f"{len(labels)} --label given for {len(args.runs)} runs; give one per run or none")
    runs = [load_scores(path, labels[i] if labels else None, args.ranks) for i, path in enumerate(args.runs)]
    out = Path(args.out) if args.out else Path(args.runs[0]) / "plots" / "scores"
    return plot_scores(runs, out, args.variant, args.smooth, args.epochs, args.series)


def main(argv: list[str] | None = None) -> int:
    """``python -m contrastlab.viz.score_plots RUN [RUN ...] [--label L ...] [--out DIR]``."""
    parser = add_arguments(
        argparse.ArgumentParser(
            prog="python -m contrastlab.viz.score_plots", description="pos/neg score-distribution figures"
        )
    )
    for path in run_from_args(parser.parse_args(argv)):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
