"""Deterministic subsets of a labelled dataset: class-balanced index lists, and a renumbered subset."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

from contrastlab.errors import ConfigError


def evenly_spaced(dataset: Any, n: int) -> Any:
    """The first of every ``len / n`` samples as an :class:`IndexedSubset` (``dataset`` itself when ``n`` is 0 or
    not smaller than it): a fixed, class-spread selection that needs no random stream."""
    size = len(dataset)
    if n <= 0 or n >= size:
        return dataset
    return IndexedSubset(dataset, [i * size // n for i in range(n)])


class IndexedSubset(Dataset):
    """The samples ``indices`` of a dataset, renumbered ``0 .. len - 1`` (items keep the dataset's format).

    Unlike ``torch.utils.data.Subset`` it keeps ``classes``, ``targets`` and ``name``, and the ``index`` it
    returns is the position in the subset, so per-sample state (a box table, a memory bank) sized to the
    subset lines up.
    """

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.classes = getattr(dataset, "classes", [])
        self.targets = [dataset.targets[i] for i in self.indices] if hasattr(dataset, "targets") else []
        self.name = getattr(dataset, "name", "")

    def set_bad_images(self, policy: str, log=None) -> None:
        """Pass the unreadable-image policy to the wrapped dataset (see ``FileDataset``)."""
        if hasattr(self.dataset, "set_bad_images"):
            self.dataset.set_bad_images(policy, log)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        image, label, _ = self.dataset[self.indices[i]]
        return image, label, i


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
