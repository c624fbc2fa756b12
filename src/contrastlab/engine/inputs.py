"""What feeds the training steps: the training datasets (from the config, or given as objects) and the pipeline
that turns their images into views, in CPU DataLoader workers or in batches on the device (``data.pipeline``).

Either way an epoch's views are seeded per sample (``views.seeding.sample_seed``) or per batch
(``data.device_loader.batch_seed``), so an epoch can be resumed at any batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from contrastlab import assemble
from contrastlab.config.schema import Config
from contrastlab.data.device_images import DeviceImages, decoded_per_batch, fits_on_device
from contrastlab.data.device_loader import DeviceViewLoader, FileViewLoader
from contrastlab.engine.seeding import epoch_seed
from contrastlab.errors import ConfigError
from contrastlab.views import ViewDataset, make_photometric, seed_worker
from contrastlab.views.batch_views import BatchViews
from contrastlab.views.planners.base import Planner


def set_bad_images(dataset: Dataset, cfg: Config, log: Path) -> None:
    """Apply ``data.bad_images`` to a dataset of image files (others have nothing to skip)."""
    if hasattr(dataset, "set_bad_images"):
        log.parent.mkdir(parents=True, exist_ok=True)
        dataset.set_bad_images(cfg.data.bad_images, log)


def training_inputs(cfg: Config, dataset: Dataset | None = None, planner: Any = None) -> tuple[Dataset, ViewDataset]:
    """The raw training dataset and its :class:`~contrastlab.views.ViewDataset`.

    Args:
        cfg: Supplies whatever is not given (``data``, ``views``).
        dataset: A dataset of ``(PIL image, label, index)`` items (``data.subset`` is not applied to it), or a
            ready ``ViewDataset`` (then ``planner`` must be None). None: ``data.name`` of the config.
        planner: A :class:`~contrastlab.views.Planner` object for the training views, rendered at its view sizes
            for the config's image size with the config's photometric recipe. None: ``views.planner``.
    """
    if isinstance(dataset, ViewDataset):
        if planner is not None:
            raise ConfigError("a ViewDataset was given with a planner: the ViewDataset has its own planner; give "
                              "either a ViewDataset, or a raw dataset and a planner")
        return dataset.dataset, dataset
    base = dataset if dataset is not None else assemble.training_dataset(cfg)
    if planner is None:
        return base, assemble.training_views(cfg, base)
    if not isinstance(planner, Planner):
        raise ConfigError(f"planner {planner!r} is not a planner: give an instance of a contrastlab.views.Planner "
                          "subclass (a plan(index, width, height, generator) method and num_views)")
    sizes = planner.view_sizes(assemble.image_size(cfg))
    mean, std = assemble.normalization(cfg)
    photometrics = [make_photometric(cfg.views.photometric, view=v, mean=mean, std=std) for v in range(len(sizes))]
    return base, ViewDataset(base, planner, sizes, photometrics, seed=cfg.seed)


def test_dataset(cfg: Config, bad_image_log: Path) -> Dataset:
    """The raw ``data.test_split`` (monitors' test set), with ``data.bad_images`` applied."""
    test = assemble.dataset(cfg, cfg.data.test_split)
    set_bad_images(test, cfg, bad_image_log)
    return test


class InputPipeline:
    """The views of each batch of an epoch, from CPU DataLoader workers or rendered on the device.

    Args:
        cfg: ``data.pipeline``, ``data.workers``, ``data.compile_views``, ``seed``.
        train_set: The training views.
        device / rank: Where this rank trains.
        log: Console lines (which pipeline was chosen, and why).
    """

    def __init__(self, cfg: Config, train_set: ViewDataset, device: torch.device, rank: int,
                 log: Callable[[str], None]) -> None:
        self.cfg, self.train_set, self.device, self.rank, self.log = cfg, train_set, device, rank, log
        self.device_views = self._device_pipeline(train_set.dataset)

    @property
    def name(self) -> str:
        """``gpu-resident``, ``gpu-files`` or ``cpu-workers``."""
        if isinstance(self.device_views, DeviceViewLoader):
            return "gpu-resident"
        return "gpu-files" if isinstance(self.device_views, FileViewLoader) else "cpu-workers"

    def _device_pipeline(self, base: Dataset) -> DeviceViewLoader | FileViewLoader | None:
        """The dataset on the device with batched views, or None for CPU DataLoader workers."""
        choice, workers, log = self.cfg.data.pipeline, self.cfg.data.workers, self.log
        if choice == "cpu":
            return None
        if choice == "auto":
            fits, why = fits_on_device(base, self.device)
            if not fits:
                log(f"data.pipeline=auto: views rendered in {workers} CPU workers ({why})")
                return None
        views = BatchViews.from_view_dataset(self.train_set, compile=self.cfg.data.compile_views)
        views.log = log
        t0 = time.perf_counter()
        loader: DeviceViewLoader | FileViewLoader
        if decoded_per_batch(base):  # files of various sizes
            loader = FileViewLoader(base, views, self.device, self.cfg.seed, self.rank, workers)
            what = f"{workers} workers read the image files, {self.device} decodes and renders each batch"
        else:
            store = DeviceImages.from_dataset(base, self.device)
            loader = DeviceViewLoader(store, views, self.cfg.seed, self.rank)
            what = (f"{len(store)} images ({store.nbytes / 2**20:.0f} MiB) held on {self.device} in "
                    f"{time.perf_counter() - t0:.1f} s; views rendered there in batches")
        if choice == "auto":  # a trial batch first: auto falls back to the CPU workers rather than fail a run
            try:
                views.compile = False  # the trial runs eagerly: compiling for its batch shape would be wasted
                next(iter(loader([list(range(min(len(base), 8)))], epoch=-1)))
                views.compile = self.cfg.data.compile_views
            except Exception as exc:  # noqa: BLE001 - any failure of the GPU path means: use the CPU path
                log(f"data.pipeline=auto: the GPU pipeline failed a trial batch ({type(exc).__name__}: {exc}); "
                    f"views rendered in {workers} CPU workers instead. Set data.pipeline=gpu to see the full error.")
                return None
        log(f"data.pipeline: {what}")
        return loader

    def __call__(self, batches: list[list[int]], epoch: int, start: int = 0) -> Iterable:
        """``(views, labels, index)`` of ``batches`` (batch number ``start`` of ``epoch`` first)."""
        if self.device_views is not None:
            return self.device_views(batches, epoch, start)
        self.train_set.set_epoch(epoch)  # views are seeded per sample: workers need no seeding of their own
        return DataLoader(self.train_set, batch_sampler=batches, num_workers=self.cfg.data.workers,
                          worker_init_fn=seed_worker,
                          generator=torch.Generator().manual_seed(epoch_seed(self.cfg.seed, self.rank, epoch)),
                          pin_memory=self.device.type == "cuda")
