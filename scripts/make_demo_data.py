"""Regenerate contrastlab's embedded demo dataset from the official Fashion-MNIST files.

Selection: for each class 0..9 in turn, one ``numpy.random.default_rng(SEED)`` generator draws
``per_class`` distinct indices (``Generator.choice(..., replace=False)``) among that class's images;
the chosen indices are then sorted, so the subset keeps the official order. Train draws 500 per class
from the train split, test 100 per class from the t10k split (one fresh generator per split).

Usage::

    python scripts/make_demo_data.py [--source /usr/share/datasets/fashion-mnist] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from contrastlab.data.demo import DEMO_DIR, PER_CLASS
from contrastlab.data.fashion_mnist import DEBIAN_PATH, FILES, FashionMNIST
from contrastlab.data.idx import write_idx

SEED = 0


def select_balanced(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` images of every class, drawn without replacement."""
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False)
        for c in range(int(labels.max()) + 1)
    ]
    return np.sort(np.concatenate(chosen))


def main() -> None:
    """Read the official files, select the subsets, write gzipped IDX files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEBIAN_PATH, help="folder with the official files")
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="output folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split, per_class in PER_CLASS.items():
        full = FashionMNIST(args.source, split)
        gray = np.asarray(full.data[..., 0])
        labels = np.asarray(full.targets, dtype=np.uint8)
        keep = select_balanced(labels, per_class, SEED)
        images_name, labels_name = FILES[split]
        write_idx(args.out / f"{images_name}.gz", gray[keep])
        write_idx(args.out / f"{labels_name}.gz", labels[keep])
        print(f"{split}: {keep.size} images ({per_class} per class) from {full.root}")


if __name__ == "__main__":
    main()
