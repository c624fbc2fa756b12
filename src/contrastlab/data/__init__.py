"""Datasets: every item is ``(PIL RGB image, label, index)``; see ``docs/architecture.md``.

:data:`DATASETS` is the registry (with each dataset's normalisation and native size); :func:`build_dataset`
builds by name. Reading never downloads:
missing or malformed files raise :class:`~contrastlab.errors.DatasetError` naming the path, the
expected layout and where to get the data. The classes that can fetch their files carry a
:class:`~contrastlab.data.download.DownloadSpec` as ``download`` (used with ``data.download=true``).
"""

from __future__ import annotations

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
from contrastlab.data.stats import NATIVE_SIZE, NORMALIZATION
from contrastlab.data.stl10 import STL10
from contrastlab.data.tiny_imagenet import TinyImageNet
from contrastlab.errors import DatasetError
from contrastlab.registry import DATASETS as _DATASETS
from contrastlab.registry import register_dataset

_BUILTINS: dict[str, Callable[..., ImageDataset]] = {
    "cifar10": CIFAR10,
    "cifar100": CIFAR100,
    "stl10": STL10,
    "tiny_imagenet": TinyImageNet,
    "imagefolder": ImageFolder,
    "fashion_mnist": FashionMNIST,
    "demo": Demo,
}
for _name, _factory in _BUILTINS.items():
    register_dataset(_name, _factory, normalization=NORMALIZATION[_name], native_size=NATIVE_SIZE[_name])

DATASETS = _DATASETS
"""The dataset registry (:data:`contrastlab.registry.DATASETS`): name -> factory ``(root, split, **options)``, with
``normalization`` and ``native_size`` as its information. Users add theirs with :func:`contrastlab.register_dataset`."""


def dataset_options(name: str) -> list[str]:
    """The options (keyword arguments besides ``root`` and ``split``) that dataset ``name`` accepts."""
    return [p for p in inspect.signature(DATASETS[name]).parameters if p not in ("root", "split")]


def build_dataset(name: str, root: PathLike | None, split: str, **kwargs: Any) -> ImageDataset:
    """Build a dataset by registry name.

    Args:
        name: A name of :data:`DATASETS` (``cifar10``, ``cifar100``, ``stl10``, ``tiny_imagenet``, ``imagefolder``,
            ``fashion_mnist``, ``demo``, or one registered with :func:`contrastlab.register_dataset`).
        root: Where the dataset's files are (ignored by ``"demo"``; optional for ``"fashion_mnist"``
            when Debian's ``dataset-fashion-mnist`` package is installed).
        split: A split of that dataset, e.g. ``"train"``.
        **kwargs: Extra loader options, e.g. ``class_list`` for ``"imagefolder"``.

    Returns:
        The dataset.

    Raises:
        ConfigError: For an unknown name (with the nearest names).
        DatasetError: For an unknown option or split, or missing or malformed files.
    """
    DATASETS.check(name)
    accepted = dataset_options(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise DatasetError(f"dataset {name!r} takes no option {', '.join(map(repr, unknown))}; "
                           f"its options: {', '.join(accepted) or 'none'}")
    return DATASETS[name](root, split=split, **kwargs)


def dataset_class(name: str) -> Callable[..., ImageDataset]:
    """The factory registered as ``name`` (a class's ``download`` attribute, if any, fetches it: :mod:`.download`).

    Raises:
        ConfigError: For an unknown name, with the nearest valid ones.
    """
    return DATASETS[name]


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
    "dataset_options",
    "native_size",
    "normalization",
]


def normalization(name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel ``(mean, std)`` on the 0..1 scale of dataset ``name``."""
    return DATASETS.info(name)["normalization"]


def native_size(name: str) -> int:
    """The side of dataset ``name``'s images (the usual training resolution for ``imagefolder``)."""
    return DATASETS.info(name)["native_size"]
