"""Padded crop (``views.planner=padded_crop``): ``RandomCrop(size, padding=p)`` of the classic CIFAR augmentation.

He et al. 2016 (section 4.2): pad 4 pixels with zeros on each side, then take a random crop of the original size.
As a box this is the image's own box translated by ``(j - p, i - p)``, with ``i`` then ``j`` drawn uniformly from
``0 .. 2p`` in torchvision's order (``RandomCrop.get_params`` on the padded image), so the same RNG state gives
torchvision's crop. The box may leave the image; the renderer fills the outside with zeros, as the padding does.
Supervised MCL on CIFAR-100 uses ``p = 4``.

Example:
    >>> planner = PaddedCropPlanner(padding=4)
    >>> x0, y0, x1, y1 = planner.plan(0, 32, 32, torch.Generator().manual_seed(0))[0]
    >>> (x1 - x0, y1 - y0), -4 <= x0 <= 4
    ((32.0, 32.0), True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from contrastlab.errors import ConfigError
from contrastlab.registry import register_planner
from contrastlab.views.boxes import Box, box_from_pixels
from contrastlab.views.planners import batch_sampling as bs
from contrastlab.views.planners.base import Planner, check_image_size, check_num_views

__all__ = ["PaddedCropPlanner"]


@register_planner("padded_crop")
@dataclass(frozen=True)
class PaddedCropPlanner(Planner):
    """A same-size box shifted by up to ``padding`` pixels per view (see the module docstring).

    Args:
        padding: Pixels of zero padding on each side.
        num_views: Number of independently shifted boxes.
    """

    @dataclass
    class Settings:
        num_views: int = 2  #: number of views
        padding: int = 4  #: zero padding on each side (RandomCrop(size, padding))

    padding: int = 4
    num_views: int = 1
    pads: ClassVar[bool] = True  #: boxes may leave the image (ViewDataset then accepts them)

    def __post_init__(self) -> None:
        check_num_views(self.num_views)
        if isinstance(self.padding, bool) or not isinstance(self.padding, int) or self.padding < 0:
            raise ConfigError(f"padding must be a non-negative integer, got {self.padding!r}")

    def plan(self, index: int, width: int, height: int, generator: torch.Generator | None = None) -> list[Box]:
        """Return ``num_views`` boxes of the image's size, each shifted by up to ``padding`` pixels."""
        check_image_size(width, height)
        p = self.padding
        boxes = []
        for _ in range(self.num_views):
            top = int(torch.randint(0, 2 * p + 1, size=(1,), generator=generator).item()) - p
            left = int(torch.randint(0, 2 * p + 1, size=(1,), generator=generator).item()) - p
            boxes.append(box_from_pixels(top, left, height, width))
        return boxes

    def plan_batch(self, index: torch.Tensor, width: int | torch.Tensor, height: int | torch.Tensor,
                   generator: torch.Generator, *, store_table: torch.Tensor | None = None) -> torch.Tensor:
        """The image's box shifted by integers uniform on ``[-p, p]`` (top, then left); may leave the image."""
        w_img, h_img = bs.batch_arguments(index, width, height, generator)
        p = self.padding
        shift = torch.randint(0, 2 * p + 1, (w_img.shape[0], self.num_views, 2), generator=generator,
                              device=generator.device).to(torch.float32) - p
        w = w_img[:, None].expand(-1, self.num_views)
        h = h_img[:, None].expand(-1, self.num_views)
        return bs.boxes_from(shift[..., 1], shift[..., 0], w, h)
