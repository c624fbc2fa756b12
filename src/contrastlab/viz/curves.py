"""Training-curve plots from ``metrics.jsonl``: loss, learning rate, kNN accuracy, throughput.

A curve can carry reference values drawn as dashed horizontal lines, e.g. the kNN accuracy of the same
architecture at its initial weights (``knn_top1_random_init`` in ``results.json``, written by the demo), so a
reader sees what training added.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

LABELS = {"loss": "training loss", "lr": "learning rate", "knn_top1": "kNN top-1 (%)", "img_per_s": "images / s"}

#: ``results.json`` entries drawn as references on a curve: result key -> (curve, legend label).
RESULT_REFERENCES = {"knn_top1_random_init": ("knn_top1", "random init (same architecture)")}

References = Mapping[str, Mapping[str, float]]  # curve -> {legend label: value}


def references_from_results(run_dir: str | Path) -> dict[str, dict[str, float]]:
    """The references a run's ``results.json`` holds (see :data:`RESULT_REFERENCES`); empty without one."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        return {}
    results = json.loads(path.read_text())
    references: dict[str, dict[str, float]] = {}
    for key, (curve, label) in RESULT_REFERENCES.items():
        if isinstance(results.get(key), (int, float)):
            references.setdefault(curve, {})[label] = float(results[key])
    return references


def curve_figure(records: list[dict[str, Any]], key: str, references: Mapping[str, float] | None = None):
    """One metric's curve over epochs as a matplotlib figure (``None`` when no record holds ``key``), with each
    reference value as a labelled dashed horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    xs, ys = zip(*points)
    ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label="training")
    for label, value in (references or {}).items():
        ax.axhline(value, linestyle="--", color="0.45", label=f"{label}: {value:.1f}")
    if references:
        ax.legend(fontsize="small", loc="best")
    ax.set_xlabel("epoch")
    ax.set_ylabel(LABELS.get(key, key))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_training_curves(records: list[dict[str, Any]], out_dir: str | Path,
                         references: References | None = None) -> list[Path]:
    """Write one PNG per metric of :data:`LABELS` present in ``records`` (per-epoch dicts); ``references`` maps
    a metric to ``{label: value}`` lines drawn on its curve. Returns the files written."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key in LABELS:
        fig = curve_figure(records, key, (references or {}).get(key))
        if fig is None:
            continue
        path = out_dir / f"{key}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
