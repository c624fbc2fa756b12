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

WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
"""PIL modes of grayscale images with more than 8 bits (16-bit PNGs open as ``I;16``, or ``I`` in older Pillow)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` converted to mode RGB, 16-bit grayscale reduced to 8 bits first.

    PIL's own conversion clips 16-bit values at 255 (a 16-bit PNG turns almost white); here a value ``v`` becomes
    ``v >> 8`` (its high byte), the reduction PIL applies to 16-bit colour PNGs and
    :func:`contrastlab.data.jpeg.to_uint8` to torchvision's 16-bit decodes, so every pipeline reads a file alike.
    """
    if image.mode in WIDE_GRAY_MODES:
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        image = Image.fromarray((values >> 8).astype(np.uint8))
    return image.convert("RGB")


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


BAD_IMAGE_POLICIES = ("fail", "skip")


class FileDataset(ImageDataset):
    """Images stored as individual files, opened lazily.

    A file that cannot be decoded (corrupt, truncated, not an image) raises a
    :class:`~contrastlab.errors.DatasetError` naming it, or, after :meth:`set_bad_images` ``("skip", log)``,
    is replaced by the next readable sample (its own image, label and index) and its path is appended to
    ``log``, one line per failed read, so a run can count what it skipped across data-loading workers.

    Attributes:
        paths: One image file per sample.
    """

    paths: list[Path]
    bad_images: str = "fail"
    bad_image_log: Path | None = None

    def set_bad_images(self, policy: str, log: Path | None = None) -> None:
        """``"fail"`` (default) or ``"skip"`` unreadable files, listing skipped ones in ``log``."""
        if policy not in BAD_IMAGE_POLICIES:
            raise DatasetError(f"data.bad_images must be fail or skip, got {policy!r}")
        self.bad_images, self.bad_image_log = policy, log

    def __getitem__(self, index: int) -> Sample:
        if self.bad_images == "fail":
            return super().__getitem__(index)
        i = int(index) % len(self)
        for offset in range(len(self)):
            j = (i + offset) % len(self)
            try:
                return self.load_image(j), self.targets[j], j
            except DatasetError as exc:
                if self.bad_image_log is not None:
                    with open(self.bad_image_log, "a", encoding="utf-8") as fh:
                        fh.write(f"{self.paths[j]}\t{exc.__cause__ or exc}\n")
        raise DatasetError(f"no readable image in {self.name} ({len(self)} files tried)")

    def load_image(self, i: int) -> Image.Image:
        """Open file ``i`` and convert it to RGB (grayscale repeats its channel; 16 bits become 8, :func:`to_rgb`)."""
        path = self.paths[i]
        try:
            with Image.open(path) as img:
                return to_rgb(img)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"cannot read image {path}: {exc}; fix or remove the file, or set "
                               "data.bad_images=skip to skip unreadable images (counted in metrics.jsonl)") from exc
