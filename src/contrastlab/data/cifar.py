"""CIFAR-10 and CIFAR-100 from the official "python version" pickle files.

Each pickle holds a dict with bytes keys: ``b"data"`` is a uint8 array ``[N, 3072]`` whose rows are the
red, green and blue 32x32 planes one after the other (row-major), and ``b"labels"`` (CIFAR-10) or
``b"fine_labels"`` (CIFAR-100) is a list of N ints. The files are pickles; they are read as plain data only
(:func:`contrastlab.safe_load.load_plain_pickle`: numbers, bytes, lists, dicts and numeric numpy arrays), so a
tampered copy that names any other Python callable is refused, never run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from contrastlab.data.base import ArrayDataset
from contrastlab.data.download import DownloadSpec, RemoteFile
from contrastlab.data.layout import PathLike, check_split, dataset_error, require_file, resolve_folder
from contrastlab.safe_load import load_plain_pickle

SOURCE = ("https://www.cs.toronto.edu/~kriz/cifar.html (the 'python version' archives; extract them), or "
          "data.download=true")

CIFAR10_LAYOUT = """
root/cifar-10-batches-py/     (or root itself is this folder)
    data_batch_1 ... data_batch_5
    test_batch
    batches.meta
"""

CIFAR100_LAYOUT = """
root/cifar-100-python/        (or root itself is this folder)
    train
    test
    meta
"""

SPLITS = ("train", "test")
_PIXELS = 32 * 32 * 3


def _read_pickle(path: Path, dataset: str, layout: str) -> dict[str, Any]:
    """Load one CIFAR pickle and return it with str keys (bytes keys are decoded)."""
    require_file(path, dataset, layout, SOURCE)
    try:
        with path.open("rb") as fh:
            content = load_plain_pickle(fh, encoding="bytes")
    except Exception as exc:  # pickle raises many exception types on corrupt input
        raise dataset_error(f"{dataset}: not a readable pickle ({exc})", path, layout, SOURCE) from exc
    if not isinstance(content, dict):
        raise dataset_error(f"{dataset}: expected a pickled dict", path, layout, SOURCE)
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in content.items()}


def _field(content: dict[str, Any], key: str, path: Path, dataset: str, layout: str) -> Any:
    """Return ``content[key]`` or raise a DatasetError naming the file and the keys found."""
    if key not in content:
        found = ", ".join(sorted(content)) or "none"
        raise dataset_error(
            f"{dataset}: pickle lacks key b{key!r} (keys found: {found})", path, layout, SOURCE
        )
    return content[key]


def _read_batch(
    path: Path, label_key: str, num_classes: int, dataset: str, layout: str
) -> tuple[np.ndarray, list[int]]:
    """Read one batch file: images ``[N, 32, 32, 3]`` and labels."""
    content = _read_pickle(path, dataset, layout)
    raw = np.asarray(_field(content, "data", path, dataset, layout))
    labels = [int(v) for v in _field(content, label_key, path, dataset, layout)]
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] != _PIXELS:
        raise dataset_error(
            f"{dataset}: b'data' must be uint8 [N, {_PIXELS}], got {raw.dtype} {list(raw.shape)}",
            path,
            layout,
            SOURCE,
        )
    if len(labels) != raw.shape[0]:
        raise dataset_error(
            f"{dataset}: {raw.shape[0]} images but {len(labels)} labels", path, layout, SOURCE
        )
    if labels and not all(0 <= v < num_classes for v in labels):
        raise dataset_error(f"{dataset}: labels outside 0..{num_classes - 1}", path, layout, SOURCE)
    images = raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def _names(path: Path, key: str, dataset: str, layout: str) -> list[str]:
    """Read the class names stored under ``key`` in a meta pickle."""
    content = _read_pickle(path, dataset, layout)
    return [
        n.decode("utf-8") if isinstance(n, bytes) else str(n)
        for n in _field(content, key, path, dataset, layout)
    ]


class _CIFAR(ArrayDataset):
    """Shared loader: subclasses name their folder, files and pickle keys."""

    folder: str
    marker: str
    layout: str
    label_key: str
    names_key: str
    num_classes: int
    files: ClassVar[dict[str, tuple[str, ...]]]

    def __init__(self, root: PathLike | None, split: str = "train") -> None:
        """Load one split into memory.

        Args:
            root: The folder holding the extracted archive folder, or that folder itself.
            split: ``"train"`` or ``"test"``.

        Raises:
            DatasetError: If files are missing or malformed.
        """
        self.split = check_split(self.name, split, SPLITS)
        folder = resolve_folder(root, self.folder, self.marker, self.name, self.layout, SOURCE)
        self.root = folder
        self.classes = _names(folder / self.marker, self.names_key, self.name, self.layout)
        if len(self.classes) != self.num_classes:
            raise dataset_error(
                f"{self.name}: expected {self.num_classes} class names, found {len(self.classes)}",
                folder / self.marker,
                self.layout,
                SOURCE,
            )
        parts: list[np.ndarray] = []
        self.targets = []
        for filename in self.files[split]:
            images, labels = _read_batch(
                folder / filename, self.label_key, self.num_classes, self.name, self.layout
            )
            parts.append(images)
            self.targets.extend(labels)
        self.data = np.ascontiguousarray(np.concatenate(parts, axis=0))


class CIFAR10(_CIFAR):
    """CIFAR-10: 50,000 train and 10,000 test 32x32 RGB images in 10 classes."""

    name = "cifar10"
    download = DownloadSpec("cifar10", (RemoteFile("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                                                   "c58f30108f718f92721af3b95e74349a"),),
                            tuple(f"cifar-10-batches-py/{f}" for f in (*(f"data_batch_{k}" for k in range(1, 6)),
                                                                       "test_batch", "batches.meta")))
    folder = "cifar-10-batches-py"
    marker = "batches.meta"
    layout = CIFAR10_LAYOUT
    label_key = "labels"
    names_key = "label_names"
    num_classes = 10
    files: ClassVar[dict[str, tuple[str, ...]]] = {
        "train": tuple(f"data_batch_{k}" for k in range(1, 6)),
        "test": ("test_batch",),
    }


class CIFAR100(_CIFAR):
    """CIFAR-100: 50,000 train and 10,000 test 32x32 RGB images in 100 fine classes."""

    name = "cifar100"
    download = DownloadSpec("cifar100", (RemoteFile("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                                                    "eb9058c3a382ffc7106e4002c42a8d85"),),
                            ("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"))
    folder = "cifar-100-python"
    marker = "meta"
    layout = CIFAR100_LAYOUT
    label_key = "fine_labels"
    names_key = "fine_label_names"
    num_classes = 100
    files: ClassVar[dict[str, tuple[str, ...]]] = {"train": ("train",), "test": ("test",)}
