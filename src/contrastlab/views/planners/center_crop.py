"""Centre crop (``views.planner=center``): a centred square, for evaluation.

A square of side ``crop_fraction * min(width, height)``, snapped to whole pixels and centred like torchvision's
``center_crop``. Rendered at size ``S`` this is the usual evaluation transform ``Resize(S / crop_fraction)`` then
``CenterCrop(S)`` (resize 256 / crop 224 for ``crop_fraction=0.875``), expressed as one box so the image is
resampled once. No random numbers are drawn.

Example:
    >>> CenterCropPlanner(0.5).plan(0, 32, 32)
    [(8.0, 8.0, 24.0, 24.0)]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from contrastlab.errors import ConfigError
from contrastlab.registry import register_planner
from contrastlab.views.boxes import Box, box_from_pixels
from contrastlab.views.planners import batch_sampling as bs
from contrastlab.views.planners.base import Planner, check_image_size, check_num_views

__all__ = ["CenterCropPlanner"]


@register_planner("center")
@dataclass(frozen=True)
class CenterCropPlanner(Planner):
    """A centred square crop of side ``crop_fraction * min(width, height)`` (see the module docstring).

    Args:
        crop_fraction: Side of the square relative to the shorter image side, in (0, 1].
        num_views: Number of (identical) boxes returned.
    """

    @dataclass
    class Settings:
        num_views: int = 2  #: number of (identical) views
        crop_fraction: float = 0.875  #: side of the square relative to the shorter image side

    crop_fraction: float = 0.875
    num_views: int = 1

    def __post_init__(self) -> None:
        check_num_views(self.num_views)
        if not (0.0 < float(self.crop_fraction) <= 1.0):
            raise ConfigError(f"crop_fraction must be in (0, 1], got {self.crop_fraction!r}")
        object.__setattr__(self, "crop_fraction", float(self.crop_fraction))

    def plan(self, index: int, width: int, height: int, generator: torch.Generator | None = None) -> list[Box]:
        """Return ``num_views`` copies of the centred square box; draws no random numbers."""
        check_image_size(width, height)
        side = max(1, round(self.crop_fraction * min(width, height)))
        top = round((height - side) / 2.0)
        left = round((width - side) / 2.0)
        return [box_from_pixels(top, left, side, side)] * self.num_views

    def plan_batch(self, index: torch.Tensor, width: int | torch.Tensor, height: int | torch.Tensor,
                   generator: torch.Generator, *, store_table: torch.Tensor | None = None) -> torch.Tensor:
        """The centred square, exactly as :meth:`plan` (float64 arithmetic); ``[B, V, 4]``."""
        w_img, h_img = bs.batch_arguments(index, width, height, generator)
        w64, h64 = w_img.double(), h_img.double()
        side = torch.round(self.crop_fraction * torch.minimum(w64, h64)).clamp_min(1.0)
        top = torch.round((h64 - side) / 2.0)
        left = torch.round((w64 - side) / 2.0)
        box = bs.boxes_from(left, top, side, side).float()
        return box[:, None, :].expand(-1, self.num_views, -1).contiguous()
