"""The GPU loaders: batches rendered on the device by :class:`~contrastlab.views.batch_views.BatchViews`.

:class:`DeviceViewLoader` gathers batches from a :class:`~contrastlab.data.device_images.DeviceImages` store (the
whole dataset on the device; no worker processes). :class:`FileViewLoader` serves datasets of image files
(ImageFolder, Tiny-ImageNet): workers only read the files' bytes, a batch is decoded on the device at once
(:mod:`contrastlab.data.jpeg`) and rendered there. :class:`DeviceEvalLoader` renders the one deterministic
evaluation view per image of the monitors and the localiser the same way, in dataset order.

Both yield what the DataLoader of the CPU path yields, ``(views, labels, index)``, for the same list of batches
(:func:`~contrastlab.engine.epoch_batches.epoch_batches`). The batch indices of an epoch go to the device
in one copy; each batch's random draws come from a device generator re-seeded with :func:`batch_seed` of
``(seed, rank, epoch, position in the epoch)``, a host-side operation, so the steady state never waits on the
device and a run resumed in the middle of an epoch renders the rest of it exactly as the uninterrupted run.

Example:
    >>> from contrastlab.data import build_dataset
    >>> from contrastlab.views import make_photometric, make_planner
    >>> from contrastlab.views.batch_views import BatchViews
    >>> data = build_dataset("demo", None, "test")
    >>> views = BatchViews(make_planner("random_resized"), [28, 28],
    ...                    [make_photometric("small", v, (0.5,) * 3, (0.25,) * 3) for v in range(2)])
    >>> loader = DeviceViewLoader(DeviceImages.from_dataset(data, torch.device("cpu")), views, seed=0)
    >>> (x1, x2), labels, index = next(iter(loader([[0, 1, 2, 3]], epoch=0)))
    >>> x1.shape, labels.tolist()
    (torch.Size([4, 3, 28, 28]), [0, 0, 0, 0])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, read_file

from contrastlab.data.device_images import DeviceImages, decoded_per_batch, file_paths
from contrastlab.data.jpeg import decode_images, pad_to_canvas, to_uint8
from contrastlab.data.subsets import IndexedSubset
from contrastlab.errors import DatasetError
from contrastlab.views.batch_views import BatchViews
from contrastlab.views.seeding import sample_seed


def batch_seed(seed: int, rank: int, epoch: int, position: int) -> int:
    """The seed of batch number ``position`` of ``epoch`` on ``rank`` (SplitMix64 mixing, as ``sample_seed``)."""
    return sample_seed(sample_seed(seed, rank, 0x5EED), epoch, position)


class DeviceViewLoader:
    """Iterate ``(views, labels, index)`` over batches of a device-resident dataset (see the module docstring).

    Args:
        store: The images and labels on the device.
        views: The batched planner + renderer + recipes.
        seed: The run's seed.
        rank: This process's rank (each rank draws its own views).
    """

    def __init__(self, store: DeviceImages, views: BatchViews, seed: int, rank: int = 0) -> None:
        self.store = store
        self.views = views
        self.seed = int(seed)
        self.rank = int(rank)
        self.generator = torch.Generator(device=store.images.device)

    @property
    def device(self) -> torch.device:
        return self.store.images.device

    def __call__(self, batches: Sequence[Sequence[int]], epoch: int,
                 start: int = 0) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]:
        """Yield the batches of ``epoch``; ``batches[0]`` is batch number ``start`` of the epoch (a resumed run)."""
        if not batches:
            return
        self.views.refresh(self.device)  # the localiser may have moved the boxes since the last epoch
        table = torch.as_tensor(batches, dtype=torch.long)
        if self.device.type == "cuda":
            table = table.pin_memory()
        table = table.to(self.device, non_blocking=True)
        for k in range(table.shape[0]):
            self.generator.manual_seed(batch_seed(self.seed, self.rank, epoch, start + k))
            index = table[k]
            views = self.views(self.store.images[index], index, self.generator)
            yield views, self.store.targets[index], index


class _FileBytes(Dataset):
    """``(file bytes as a uint8 tensor, label, index)``: all the DataLoader workers do on the GPU file path."""

    def __init__(self, paths: list[Path], targets: Sequence[int]) -> None:
        self.paths, self.targets = paths, list(targets)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        try:
            data = read_file(str(self.paths[i]))
        except (OSError, RuntimeError) as exc:
            raise DatasetError(f"cannot read image {self.paths[i]}: {exc}") from exc
        return data, self.targets[i], i


def _collate_bytes(items: list) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    blobs, labels, index = zip(*items)
    return list(blobs), torch.tensor(labels, dtype=torch.long), torch.tensor(index, dtype=torch.long)


class FileViewLoader:
    """The GPU pipeline for image files (ImageFolder, Tiny-ImageNet): workers read bytes, the device decodes a
    batch at once (:func:`~contrastlab.data.jpeg.decode_images`; JPEG on the GPU, anything else on the CPU)
    and the batched renderer makes the views.

    A file that does not decode raises :class:`~contrastlab.errors.DatasetError` naming it. When the dataset's
    policy is to skip them (``FileDataset.set_bad_images("skip", log)``, i.e. ``data.bad_images=skip``) it is
    listed in that log and replaced by the batch's first readable sample (its image, label and index), as the
    CPU path replaces it by the next readable one.

    Args:
        dataset: A FileDataset (or a subset of one).
        views: The batched planner + renderer + recipes.
        device: Where to decode and render.
        seed: The run's seed.
        rank: This process's rank.
        workers: DataLoader workers reading the files.
    """

    def __init__(self, dataset: Any, views: BatchViews, device: torch.device, seed: int, rank: int = 0,
                 workers: int = 4) -> None:
        paths = file_paths(dataset)
        if paths is None:
            raise DatasetError(f"{type(dataset).__name__} is not a dataset of image files")
        self.files = _FileBytes(paths, dataset.targets)
        self.views, self.device, self.seed, self.rank, self.workers = views, device, int(seed), int(rank), workers
        files = dataset
        while isinstance(files, IndexedSubset):
            files = files.dataset
        self.bad_images, self.bad_image_log = files.bad_images, files.bad_image_log  # the dataset's own policy
        self.generator = torch.Generator(device=device)

    def _decode(self, blobs: list[torch.Tensor], labels: torch.Tensor,
                index: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        try:
            return decode_images(blobs, self.device), labels, index
        except RuntimeError:  # find the file(s) that failed, one by one
            pass
        images, keep = [], []
        for k, blob in enumerate(blobs):
            try:
                images.append(to_uint8(decode_image(blob, mode=ImageReadMode.RGB)).to(self.device))
                keep.append(k)
            except RuntimeError as exc:
                path = self.files.paths[int(index[k])]
                if self.bad_images != "skip":
                    raise DatasetError(f"cannot decode image {path}: {exc}; fix or remove the file, or set "
                                       "data.bad_images=skip to skip unreadable images") from exc
                if self.bad_image_log is not None:
                    with open(self.bad_image_log, "a", encoding="utf-8") as fh:
                        fh.write(f"{path}\t{exc}\n")
        if not keep:
            raise DatasetError(f"no image of a batch of {len(blobs)} files could be decoded")
        rows = [keep[0] if k not in keep else k for k in range(len(blobs))]
        by_row = dict(zip(keep, images))
        return [by_row[r] for r in rows], labels[rows], index[rows]

    def __call__(self, batches: Sequence[Sequence[int]], epoch: int,
                 start: int = 0) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]:
        """Yield the batches of ``epoch``; ``batches[0]`` is batch number ``start`` of the epoch."""
        if not batches:
            return
        self.views.refresh(self.device)
        loader = DataLoader(self.files, batch_sampler=[list(b) for b in batches], num_workers=self.workers,
                            collate_fn=_collate_bytes)
        for k, (blobs, labels, index) in enumerate(loader):
            images, labels, index = self._decode(blobs, labels, index)
            canvas, sizes = pad_to_canvas(images)
            labels, index = labels.to(self.device, non_blocking=True), index.to(self.device, non_blocking=True)
            self.generator.manual_seed(batch_seed(self.seed, self.rank, epoch, start + k))
            yield self.views(canvas, index, self.generator, image_sizes=sizes), labels, index


def _view_dataset_and_rows(dataset: Any) -> tuple[Any, list[int]]:
    """The evaluation ``ViewDataset`` under ``dataset``'s ``Subset`` / ``IndexedSubset`` wrappers, and the rows of
    its base dataset that ``dataset``'s samples ``0 .. len - 1`` are."""
    rows = list(range(len(dataset)))
    while hasattr(dataset, "indices") and hasattr(dataset, "dataset") and not hasattr(dataset, "planner"):
        rows = [int(dataset.indices[i]) for i in rows]
        dataset = dataset.dataset
    if not hasattr(dataset, "planner") or not hasattr(dataset, "photometrics"):
        raise TypeError(f"DeviceEvalLoader needs a ViewDataset (optionally inside subsets), got {type(dataset).__name__}")
    return dataset, rows


class DeviceEvalLoader:
    """Evaluation views of a dataset (one deterministic view per image), rendered on the device in dataset order.

    The device counterpart of ``DataLoader(eval_set, shuffle=False)`` for the kNN monitor, the test-accuracy
    monitor, the ContrastiveCrop localiser and ``contrastlab eval`` when training runs on the GPU pipeline: the
    base images are copied to the device on the first pass and kept (or gathered from ``store``, the training
    store, when the base dataset is the one it holds); each batch is an index gather and one batched render of
    the evaluation recipe (centre crop or whole image, resize, normalise). Image files of various sizes
    (ImageFolder) are instead read by ``workers`` and decoded per batch, as :class:`FileViewLoader` does for
    training. Yields ``(view, labels, index)``: the view ``[B, 3, S, S]`` and the labels on the device, ``index``
    the base dataset's row numbers (a CPU tensor), as the CPU ``ViewDataset`` yields them.

    Args:
        dataset: An evaluation :class:`~contrastlab.views.dataset.ViewDataset`, optionally inside ``Subset`` or
            ``IndexedSubset`` wrappers (kNN bank fractions, random caps, a rank's shard).
        device: Where to render.
        batch_size: Images per batch.
        store: The base dataset already on ``device`` (the training store), or None to copy what is needed.
        workers: For image files of various sizes: the workers reading them (unreadable files: see
            :class:`FileViewLoader`).
    """

    def __init__(self, dataset: Any, device: torch.device, batch_size: int = 256,
                 store: DeviceImages | None = None, workers: int = 0) -> None:
        view_set, rows = _view_dataset_and_rows(dataset)
        if len(view_set.sizes) != 1:
            raise ValueError(f"an evaluation dataset renders one view per image, this one renders {len(view_set.sizes)}")
        self.dataset = dataset
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.views = BatchViews.from_view_dataset(view_set)
        self.base = view_set.dataset
        self.rows = torch.as_tensor(rows, dtype=torch.long)
        self._store = store
        self._positions: torch.Tensor | None = None  # row of each sample in the store, on the device
        self.generator = torch.Generator(device=self.device)
        self._files: FileViewLoader | None = None  # image files of various sizes: decoded per batch
        if store is None and decoded_per_batch(self.base):
            self._files = FileViewLoader(self.base, self.views, self.device, seed=0, workers=workers)

    def __len__(self) -> int:
        return (len(self.rows) + self.batch_size - 1) // self.batch_size

    def _load(self) -> tuple[DeviceImages, torch.Tensor]:
        if self._store is None:  # only the rows this loader reads
            self._store = DeviceImages.from_dataset(IndexedSubset(self.base, self.rows.tolist()), self.device)
            self._positions = torch.arange(len(self.rows), device=self.device)
        elif self._positions is None:
            if len(self._store) != len(self.base):
                raise ValueError(f"the store holds {len(self._store)} images, the evaluation base {len(self.base)}")
            self._positions = self.rows.to(self.device)
        return self._store, self._positions

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self._files is not None:
            batches = [chunk.tolist() for chunk in self.rows.split(self.batch_size)]
            for views, labels, index in self._files(batches, epoch=0):
                yield views[0], labels, index.cpu()  # rows of the files read (a skipped file's stand-in)
            return
        store, positions = self._load()
        for start in range(0, len(self.rows), self.batch_size):
            picked = positions[start:start + self.batch_size]
            self.generator.manual_seed(0)  # the evaluation recipe draws nothing random; kept for a fixed stream
            view = self.views(store.images[picked], picked, self.generator)[0]
            yield view, store.targets[picked], self.rows[start:start + self.batch_size]


def evaluation_loader(dataset: Dataset, *, batch_size: int, workers: int, device: torch.device | str,
                      on_device: bool = False, store: DeviceImages | None = None) -> DataLoader | DeviceEvalLoader:
    """In-order batches of an evaluation dataset: rendered on ``device`` (``on_device``) or by CPU workers."""
    device = torch.device(device)
    if on_device:
        return DeviceEvalLoader(dataset, device, batch_size, store, workers=workers)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=device.type == "cuda")
