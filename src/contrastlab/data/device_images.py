"""A whole dataset held on the training device as one uint8 tensor ``[N, C, H, W]`` (the GPU-resident loader's store).

CIFAR-10/100 (150 MB), STL-10 (at 96 px, 3 GB for the unlabeled split), Tiny-ImageNet (1.2 GB), Fashion-MNIST and
the demo fit in a GPU's memory many times over. Holding them there removes the DataLoader workers: a batch is
an index gather on the device, then the batched renderer (:mod:`contrastlab.views.gpu_render`).

Datasets that already keep their images in one array (:class:`~contrastlab.data.base.ArrayDataset`: CIFAR,
Fashion-MNIST, the demo, STL-10) are copied without decoding; Fashion-MNIST's three identical channels are kept
as one. Image files of a dataset that declares one size for all of them (``uniform_size``: Tiny-ImageNet's
64x64) are decoded once, in batches, on the device. Other datasets are decoded image by image, and their images
must all have one size.

Example:
    >>> from contrastlab.data import build_dataset
    >>> store = DeviceImages.from_dataset(build_dataset("demo", None, "test"), torch.device("cpu"))
    >>> tuple(store.images.shape), store.images.dtype
    ((1000, 1, 28, 28), torch.uint8)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.io import read_file

from contrastlab.data.base import ArrayDataset, FileDataset, to_rgb
from contrastlab.data.jpeg import decode_images
from contrastlab.data.subsets import IndexedSubset
from contrastlab.errors import DatasetError

DECODE_CHUNK = 1024
"""Files decoded per batch when a dataset of files is loaded onto the device."""

DEVICE_MEMORY_FRACTION = 0.5
"""``data.pipeline=auto`` keeps a dataset on the GPU only if it takes at most this share of the free memory."""


def _array_view(dataset: Any) -> tuple[np.ndarray, np.ndarray | None] | None:
    """``(array [M, H, W, 3], rows or None)`` when ``dataset``'s images are rows of one uint8 array, else None."""
    if isinstance(dataset, IndexedSubset):
        inner = _array_view(dataset.dataset)
        if inner is None:
            return None
        array, rows = inner
        picked = np.asarray(dataset.indices)
        return array, picked if rows is None else rows[picked]
    if isinstance(dataset, ArrayDataset) and isinstance(getattr(dataset, "data", None), np.ndarray):
        return dataset.data, None
    return None


def file_paths(dataset: Any) -> list[Path] | None:
    """The image file of every sample of ``dataset`` (a FileDataset or a subset of one), or None."""
    if isinstance(dataset, IndexedSubset):
        inner = file_paths(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    return list(dataset.paths) if isinstance(dataset, FileDataset) else None


def declared_size(dataset: Any) -> tuple[int, int] | None:
    """``(H, W)`` that every image of ``dataset`` has by its definition (``uniform_size``), or None."""
    inner = dataset.dataset if isinstance(dataset, IndexedSubset) else dataset
    size = getattr(inner, "uniform_size", None)
    return None if size is None else (int(size[0]), int(size[1]))


def decoded_per_batch(dataset: Any) -> bool:
    """Whether the GPU pipeline decodes ``dataset`` batch by batch: image files with no declared common size."""
    return file_paths(dataset) is not None and declared_size(dataset) is None


def image_shape(dataset: Any) -> tuple[int, int, int] | None:
    """``(C, H, W)`` the store would hold, known without decoding anything, or None if only decoding can tell."""
    view = _array_view(dataset)
    if view is None:
        size = declared_size(dataset)
        return None if size is None else (3, *size)
    array = view[0]
    channels = 1 if array.shape[-1] == 3 and array.strides[-1] == 0 else array.shape[-1]
    return channels, array.shape[1], array.shape[2]


def _decode_files(paths: list[Path], size: tuple[int, int], device: torch.device,
                  chunk: int = DECODE_CHUNK) -> torch.Tensor:
    """Decode image files declared to be ``size`` (H, W) in batches on ``device``, into ``[N, 3, H, W]`` uint8."""
    out = torch.empty(len(paths), 3, *size, dtype=torch.uint8, device=device)
    for start in range(0, len(paths), chunk):
        group = paths[start:start + chunk]
        blobs = []
        for path in group:
            try:
                blobs.append(read_file(str(path)))
            except (OSError, RuntimeError) as exc:
                raise DatasetError(f"cannot read image {path}: {exc}") from exc
        try:
            images = decode_images(blobs, device)
        except RuntimeError as exc:
            raise DatasetError(f"cannot decode an image among {group[0]} .. {group[-1]}: {exc}; use "
                               "data.pipeline=cpu with data.bad_images=skip to skip unreadable images") from exc
        for k, image in enumerate(images):
            if tuple(image.shape[-2:]) != size:
                raise DatasetError(f"image {group[k]} is {image.shape[-1]}x{image.shape[-2]}, not the "
                                   f"{size[1]}x{size[0]} this dataset declares; use data.pipeline=cpu")
            out[start + k] = image
    return out


def load_images(dataset: Any, device: torch.device | None = None) -> torch.Tensor:
    """Every image of ``dataset`` as one uint8 tensor ``[N, C, H, W]`` (C = 1 for broadcast grayscale).

    Files of a dataset with a declared ``uniform_size`` are decoded in batches on ``device`` (the result lives
    there); everything else is assembled on the CPU.

    Raises:
        DatasetError: The images do not all have the same size (they cannot be stacked), or one cannot be read.
    """
    paths, size = file_paths(dataset), declared_size(dataset)
    if paths is not None and size is not None:
        return _decode_files(paths, size, device or torch.device("cpu"))
    view = _array_view(dataset)
    if view is not None:
        array, rows = view
        if array.shape[-1] == 3 and array.strides[-1] == 0:  # one channel broadcast to three (Fashion-MNIST)
            array = array[..., :1]
        picked = array if rows is None else array[rows]
        return torch.from_numpy(np.array(picked)).permute(0, 3, 1, 2).contiguous()  # a writable copy
    first = None
    images = []
    for i in range(len(dataset)):
        image = np.asarray(to_rgb(dataset[i][0]))
        if first is None:
            first = image.shape
        elif image.shape != first:
            raise DatasetError(
                f"image {i} of {getattr(dataset, 'name', type(dataset).__name__)} is {image.shape[1]}x{image.shape[0]} "
                f"but image 0 is {first[1]}x{first[0]}: a device-resident dataset needs images of one size. "
                "Use data.pipeline=cpu (or auto) for this dataset.")
        images.append(torch.from_numpy(image.copy()))
    if not images:
        raise DatasetError("the dataset is empty; nothing to hold on the device")
    return torch.stack(images).permute(0, 3, 1, 2).contiguous()


class DeviceImages:
    """Images ``[N, C, H, W]`` (uint8) and labels ``[N]`` (long) of a dataset, on one device.

    Args:
        images: uint8 images.
        targets: One label per image (``-1``: unlabeled).
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"DeviceImages needs uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if targets.shape != (images.shape[0],):
            raise ValueError(f"{images.shape[0]} images but targets of shape {tuple(targets.shape)}")
        self.images = images
        self.targets = targets.long()

    @classmethod
    def from_dataset(cls, dataset: Any, device: torch.device) -> DeviceImages:
        """Copy ``dataset`` (images and ``targets``) to ``device``."""
        images = load_images(dataset, device)
        targets = torch.as_tensor(list(getattr(dataset, "targets", [-1] * len(images))), dtype=torch.long)
        return cls(images.to(device), targets.to(device))

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held on the device."""
        return self.images.numel() + 8 * self.targets.numel()


def fits_on_device(dataset: Any, device: torch.device,
                   fraction: float = DEVICE_MEMORY_FRACTION) -> tuple[bool, str]:
    """Whether ``data.pipeline=auto`` should render ``dataset``'s views on ``device``, and why (a sentence).

    Only CUDA devices qualify. A dataset stored as one array (its size known without a decoding pass) is held
    there if it takes at most ``fraction`` of the device's free memory; image files of various sizes are read by
    workers and decoded batch by batch there, which holds nothing but the batch. The caller renders a trial batch
    before it commits to the device.
    """
    if device.type != "cuda":
        return False, f"the device is {device.type}, not a GPU"
    shape = image_shape(dataset)
    if shape is None:
        if decoded_per_batch(dataset):
            return True, f"image files, decoded batch by batch on {device}"
        return False, "its images are neither one array nor image files (the batched pipeline cannot read them)"
    need = len(dataset) * int(np.prod(shape))
    free, _ = torch.cuda.mem_get_info(device)
    if need > fraction * free:
        return False, f"it needs {need / 2**30:.1f} GiB, more than {fraction:.0%} of the {free / 2**30:.1f} GiB free"
    return True, f"{need / 2**20:.0f} MiB of images on {device}"
