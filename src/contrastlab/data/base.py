"""Base classes shared by every dataset: the ``(image, label, index)`` sample contract.

A dataset item is ``(PIL.Image in mode "RGB", label: int, index: int)``; unlabeled samples carry
label ``-1``. :class:`ImageDataset` handles indexing (negative indices, bounds) and leaves only image
decoding to subclasses. :class:`ArrayDataset` serves images from one uint8 array ``[N, H, W, 3]``;
:class:`FileDataset` opens image files lazily with PIL.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from contrastlab.errors import DatasetError

Sample = tuple[Image.Image, int, int]

UNLABELED = -1
"""Label of samples that have none (e.g. STL-10's unlabeled split)."""


class ImageDataset(Dataset[Sample]):
    """A dataset of RGB images with integer labels.

    Attributes:
        name: Registry name (keys :mod:`contrastlab.data.stats`).
        split: The split this instance holds.
        classes: Class names; ``targets`` index into this list.
        targets: One label per sample, ``-1`` for unlabeled samples.
    """

    name: str = ""
    split: str = ""
    classes: list[str]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Sample:
        size = len(self)
        i = int(index)
        if i < 0:
            i += size
        if not 0 <= i < size:
            raise IndexError(f"index {index} out of range for {self.name} ({size} samples)")
        return self.load_image(i), self.targets[i], i

    def load_image(self, i: int) -> Image.Image:
        """Decode sample ``i`` (already bounds-checked) as an RGB image."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, "
            f"samples={len(self)}, classes={len(self.classes)})"
        )


class ArrayDataset(ImageDataset):
    """Images held in one uint8 array ``data`` of shape ``[N, H, W, 3]`` (possibly a memmap or view)."""

    data: np.ndarray

    def load_image(self, i: int) -> Image.Image:
        """Build an RGB image from row ``i`` of ``data``."""
        return Image.fromarray(np.ascontiguousarray(self.data[i]))


class FileDataset(ImageDataset):
    """Images stored as individual files, opened lazily.

    Attributes:
        paths: One image file per sample.
    """

    paths: list[Path]

    def load_image(self, i: int) -> Image.Image:
        """Open file ``i`` and convert it to RGB (grayscale repeats its channel)."""
        path = self.paths[i]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except OSError as exc:
            raise DatasetError(f"cannot read image {path}: {exc}") from exc
