"""Deterministic subsets of a labelled dataset."""

from __future__ import annotations

from collections.abc import Sequence

from contrastlab.errors import ConfigError


def class_balanced_subset(targets: Sequence[int], fraction: float) -> list[int]:
    """Indices of the first ``int(fraction * n_c)`` samples of every class ``c``, in dataset order.

    CaCo's kNN bank (``data_processing/imagenet.py`` upstream) keeps the first 20% of each ImageNet class in
    sorted file order; with this project's loaders, dataset order is that file order. Unlabeled samples
    (label ``-1``) are never selected.

    Args:
        targets: one label per sample.
        fraction: the share of each class to keep, in (0, 1].

    Returns:
        sorted sample indices.

    Example:
        >>> class_balanced_subset([0, 0, 1, 1, 0, 1], 0.5)
        [0, 2]
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"monitor.bank_fraction must be in (0, 1], got {fraction}")
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(targets):
        if label >= 0:
            by_class.setdefault(int(label), []).append(i)
    kept = [i for members in by_class.values() for i in members[: int(len(members) * fraction)]]
    return sorted(kept)
