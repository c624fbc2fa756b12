"""Random resized crop (``views.planner=random_resized``): independent Inception-style crops, one per view.

SimCLR (Chen et al. 2020), MoCo v2, BYOL and most recipes: each view's box is drawn as torchvision's
``RandomResizedCrop.get_params``. Up to 10 attempts, each drawing an area fraction uniformly from ``scale`` and an
aspect ratio log-uniformly from ``ratio``, ``w = round(sqrt(A a))``, ``h = round(sqrt(A / a))``; the first that
fits is placed at a uniform integer position; if none fits, the central crop with the aspect ratio clamped to
``ratio``. The per-image law makes the same torch RNG calls in the same order as torchvision, so under one RNG
state the boxes are torchvision's; the batched law draws the same distribution for a batch on the device.

Example:
    >>> planner = RandomResizedCropPlanner(scale=(0.2, 1.0))
    >>> [len(box) for box in planner.plan(0, 32, 32)]
    [4, 4]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from contrastlab.registry import register_planner
from contrastlab.views.boxes import Box, box_from_pixels
from contrastlab.views.planners import batch_sampling as bs
from contrastlab.views.planners.base import Planner, as_range, check_image_size, check_num_views

__all__ = ["RandomResizedCropPlanner", "central_crop_box", "sample_resized_crop"]


def sample_resized_crop(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> Box:
    """Draw one random resized crop box (torchvision's ``RandomResizedCrop.get_params``, step for step).

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
        scale: Range of the crop's area as a fraction of the image area.
        ratio: Range of the crop's aspect ratio (width / height).
        generator: RNG to draw from; ``None`` uses torch's global RNG.

    Returns:
        An integer-valued box inside the image.
    """
    area = height * width
    # Same float32 log as torchvision, so the sampled ratios agree bit for bit.
    log_ratio = torch.log(torch.tensor(ratio))
    log_lo, log_hi = float(log_ratio[0]), float(log_ratio[1])
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=generator)).item()
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return box_from_pixels(top, left, h, w)
    return central_crop_box(width, height, ratio)


def central_crop_box(width: int, height: int, ratio: tuple[float, float]) -> Box:
    """RandomResizedCrop's fallback: the whole image cut to the nearest aspect ratio in ``ratio``, centred."""
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    return box_from_pixels((height - h) // 2, (width - w) // 2, h, w)


@register_planner("random_resized")
@dataclass(frozen=True)
class RandomResizedCropPlanner(Planner):
    """Independent random resized crops per view (see the module docstring).

    Args:
        num_views: Number of views (2 for SimCLR/MoCo/BYOL).
        scale: Range of crop area as a fraction of the image area.
        ratio: Range of crop aspect ratio (width / height).
    """

    @dataclass
    class Settings:
        num_views: int = 2  #: number of views
        scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  #: crop area fraction range
        ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  #: crop aspect ratio range

    num_views: int = 2
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

    def __post_init__(self) -> None:
        check_num_views(self.num_views)
        object.__setattr__(self, "scale", as_range(self.scale, "scale", 0.0, 1.0))
        object.__setattr__(self, "ratio", as_range(self.ratio, "ratio", 0.0, math.inf))

    def plan(self, index: int, width: int, height: int, generator: torch.Generator | None = None) -> list[Box]:
        """Return ``num_views`` independently drawn boxes."""
        check_image_size(width, height)
        return [sample_resized_crop(width, height, self.scale, self.ratio, generator) for _ in range(self.num_views)]

    def plan_batch(self, index: torch.Tensor, width: int | torch.Tensor, height: int | torch.Tensor,
                   generator: torch.Generator, *, store_table: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, num_views, 4]`` random resized crops drawn on the device."""
        w_img, h_img = bs.batch_arguments(index, width, height, generator)
        return bs.random_resized(w_img, h_img, self.num_views, self.scale, self.ratio, generator)
