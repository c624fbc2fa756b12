"""``ViewDataset``: wrap a dataset of images into one of augmented views (plan, render, recipe).

For each sample the planner plans every view's box, then each box is rendered at its view's size and
passed through its view's photometric recipe. This is the CPU path of the view layer; it runs in DataLoader
workers, drawing from torch's global RNG, which ``DataLoader`` seeds per worker (pair it with
:func:`~contrastlab.views.seeding.seed_worker`). Two views with ``RandomResizedCropPlanner`` and the
``"simclr"`` recipe give SimCLR's pipeline (Chen et al. 2020); ``MultiCropPlanner`` with two sizes gives
SwAV's multi-crop (Caron et al. 2020).

Example:
    >>> views = ViewDataset(  # doctest: +SKIP
    ...     data, RandomResizedCropPlanner(), sizes=[32, 32],
    ...     photometrics=[make_photometric("small", v, mean, std) for v in range(2)])
    >>> (x1, x2), label, index = views[0]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from contrastlab.data.base import to_rgb
from contrastlab.errors import ConfigError
from contrastlab.views.boxes import validate_box
from contrastlab.views.joint_blur import JointBlur
from contrastlab.views.photometric import make_photometric
from contrastlab.views.planners.base import Planner
from contrastlab.views.planners.center_crop import CenterCropPlanner
from contrastlab.views.planners.fixed_box import FixedBoxPlanner
from contrastlab.views.render import render_box
from contrastlab.views.seeding import sample_seed

Photometric = Callable[..., torch.Tensor]  # (PIL image[, generator]) -> normalised tensor


class ViewDataset(Dataset):
    """A dataset of views: ``(views: list[Tensor[3, S, S]], label, index)`` per sample.

    Args:
        dataset: Returns ``(PIL image, label, index)`` (or ``(image, label)``, index taken as ``i``).
        planner: Plans one box per view; receives the sample's ``index``.
        sizes: Output side length of each view.
        photometrics: Photometric recipe of each view (PIL image -> normalised tensor).
        return_boxes: Also return the planned boxes as a float tensor ``[V, 4]`` (x0, y0, x1, y1).
        seed: Draw each sample's boxes and photometric parameters from its own generator, seeded by
            :func:`~contrastlab.views.seeding.sample_seed` of ``(seed, epoch, index)`` (call
            :meth:`set_epoch` before each epoch). ``None`` draws from torch's global RNG (per worker).
        joint_blur: :class:`~contrastlab.views.joint_blur.JointBlur`: the first two views' blur sigmas are
            drawn jointly (for every pair, or, in ``either`` mode, for the pairs whose coin picks JointBlur).
        independent_planner: ``either`` mode: the planner of the JointBlur pairs (independent crops).

    Raises:
        ConfigError: If ``sizes``, ``photometrics`` and ``planner.num_views`` disagree, or a size is invalid.
    """

    def __init__(
        self,
        dataset: Any,
        planner: Planner,
        sizes: Sequence[int],
        photometrics: Sequence[Photometric],
        return_boxes: bool = False,
        seed: int | None = None,
        joint_blur: JointBlur | None = None,
        independent_planner: Planner | None = None,
    ) -> None:
        sizes = list(sizes)
        photometrics = list(photometrics)
        num_views = planner.num_views
        if len(sizes) != num_views or len(photometrics) != num_views:
            raise ConfigError(
                f"the planner makes {num_views} views but {len(sizes)} sizes and {len(photometrics)} "
                "photometric recipes were given; give one size and one recipe per view"
            )
        for size in sizes:
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ConfigError(f"view sizes must be positive integers, got {sizes!r}")
        self.dataset = dataset
        self.planner = planner
        self.sizes = sizes
        self.photometrics = photometrics
        self.return_boxes = return_boxes
        self.seed = seed
        self.epoch = 0
        if joint_blur is not None:
            if num_views < 2:
                raise ConfigError("joint blur needs a pair of views; the planner makes one")
            if joint_blur.mode == "either" and (independent_planner is None
                                                or independent_planner.num_views != num_views):
                raise ConfigError("joint blur mode 'either' needs an independent planner making the same number "
                                  "of views as the joint planner")
        self.joint_blur = joint_blur
        self.independent_planner = independent_planner

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose per-sample random streams the next items use (with ``seed``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        sample = self.dataset[i]
        if len(sample) == 3:
            image, label, index = sample
        else:
            (image, label), index = sample, i
        if not isinstance(image, Image.Image):
            raise TypeError(f"ViewDataset needs PIL images, dataset gave {type(image).__name__}")
        if image.mode != "RGB":
            image = to_rgb(image)
        width, height = image.size
        g = None if self.seed is None else torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
        joint = self.joint_blur is not None and self.joint_blur.use_joint_blur(g)
        planner = self.independent_planner if joint and self.joint_blur.mode == "either" else self.planner
        boxes = planner.plan(index, width, height, g)
        sigmas = self.joint_blur.sample(g) if joint else None
        if len(boxes) != len(self.sizes):
            raise RuntimeError(f"planner returned {len(boxes)} boxes, expected {len(self.sizes)}")
        pads = getattr(self.planner, "pads", False)
        boxes = [validate_box(box, width, height, allow_outside=pads) for box in boxes]
        views = []
        for v, (box, size, recipe) in enumerate(zip(boxes, self.sizes, self.photometrics)):
            kwargs = {"blur_sigma": sigmas[v]} if sigmas is not None and v < 2 else {}
            rendered = render_box(image, box, size)
            views.append(recipe(rendered, g, **kwargs) if g is not None else recipe(rendered, **kwargs))
        if self.return_boxes:
            return views, label, index, torch.tensor(boxes, dtype=torch.float32)
        return views, label, index


def eval_view_dataset(
    dataset: Any,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_fraction: float | None = 1.0,
) -> ViewDataset:
    """One deterministic view per sample for evaluation (kNN, linear probe): centre crop, resize, normalise.

    ``crop_fraction=0.875`` is the resize 256 / crop 224 convention (see ``CenterCropPlanner``);
    ``1.0`` keeps the largest centred square (the whole image when it is square); ``None`` resizes the
    whole image to ``size`` x ``size`` regardless of its aspect ratio. The recipe is ``"eval"`` (no flip).
    """
    planner: Planner = FixedBoxPlanner() if crop_fraction is None else CenterCropPlanner(crop_fraction)
    return ViewDataset(dataset, planner, [size], [make_photometric("eval", 0, mean, std)])
