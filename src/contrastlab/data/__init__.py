"""Datasets: every item is ``(PIL RGB image, label, index)``; see ``docs/architecture.md``.

:func:`build_dataset` is the registry; :data:`DATASETS` lists its names. Reading never downloads:
missing or malformed files raise :class:`~contrastlab.errors.DatasetError` naming the path, the
expected layout and where to get the data. The classes that can fetch their files carry a
:class:`~contrastlab.data.download.DownloadSpec` as ``download`` (used with ``data.download=true``).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from contrastlab.data.base import UNLABELED, ArrayDataset, FileDataset, ImageDataset
from contrastlab.data.cifar import CIFAR10, CIFAR100
from contrastlab.data.demo import Demo
from contrastlab.data.fashion_mnist import FashionMNIST
from contrastlab.data.imagefolder import ImageFolder
from contrastlab.data.layout import PathLike
from contrastlab.data.samplers import ClassIndex, MPerClassSampler
from contrastlab.data.stl10 import STL10
from contrastlab.data.tiny_imagenet import TinyImageNet
from contrastlab.errors import DatasetError

_REGISTRY: dict[str, Callable[..., ImageDataset]] = {
    "cifar10": CIFAR10,
    "cifar100": CIFAR100,
    "stl10": STL10,
    "tiny_imagenet": TinyImageNet,
    "imagefolder": ImageFolder,
    "fashion_mnist": FashionMNIST,
    "demo": Demo,
}

DATASETS: tuple[str, ...] = tuple(_REGISTRY)
"""Names accepted by :func:`build_dataset`."""


def build_dataset(name: str, root: PathLike | None, split: str, **kwargs: Any) -> ImageDataset:
    """Build a dataset by registry name.

    Args:
        name: One of :data:`DATASETS`.
        root: Where the dataset's files are (ignored by ``"demo"``; optional for ``"fashion_mnist"``
            when Debian's ``dataset-fashion-mnist`` package is installed).
        split: A split of that dataset, e.g. ``"train"``.
        **kwargs: Extra loader options, e.g. ``class_list`` for ``"imagefolder"``.

    Returns:
        The dataset.

    Raises:
        DatasetError: For an unknown name or split, or missing or malformed files.
    """
    cls = dataset_class(name)
    accepted = [p for p in inspect.signature(cls).parameters if p not in ("root", "split")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise DatasetError(f"dataset {name!r} takes no option {', '.join(map(repr, unknown))}; "
                           f"its options: {', '.join(accepted) or 'none'}")
    return cls(root, split=split, **kwargs)


def dataset_class(name: str) -> Callable[..., ImageDataset]:
    """The class registered as ``name`` (its ``download`` attribute, if any, fetches it: :mod:`.download`).

    Raises:
        DatasetError: For an unknown name, with the closest valid one.
    """
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), DATASETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DatasetError(f"unknown dataset {name!r}{hint}; valid names: {', '.join(DATASETS)}")
    return _REGISTRY[name]


__all__ = [
    "CIFAR10",
    "CIFAR100",
    "DATASETS",
    "STL10",
    "UNLABELED",
    "ArrayDataset",
    "ClassIndex",
    "Demo",
    "FashionMNIST",
    "FileDataset",
    "ImageDataset",
    "ImageFolder",
    "MPerClassSampler",
    "TinyImageNet",
    "build_dataset",
    "dataset_class",
]
