"""Training-curve plots from ``metrics.jsonl``: loss, learning rate, kNN accuracy, throughput."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_training_curves(records: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write one PNG per metric present in ``records`` (per-epoch dicts); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    labels = {"loss": "training loss", "lr": "learning rate", "knn_top1": "kNN top-1 (%)", "img_per_s": "images / s"}
    for key, label in labels.items():
        points = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{key}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
