"""Multi-crop (``views.planner=multicrop``): large global crops, then small local ones (SwAV, Caron et al. 2020).

Every box is an independent random resized crop
(:func:`~contrastlab.views.planners.random_resized.sample_resized_crop`); the ``num_large`` large views come first,
from ``large_scale``, then ``num_small`` small views from ``small_scale``. The small views are rendered at
``views.small_size`` (0: half the large side, at least 8), e.g. CaCo's 2 x 224 + 6 x 96.

Example:
    >>> MultiCropPlanner(num_small=4).num_views
    6
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from contrastlab.errors import ConfigError
from contrastlab.registry import register_planner
from contrastlab.views.boxes import Box
from contrastlab.views.planners import batch_sampling as bs
from contrastlab.views.planners.base import (
    Planner,
    PlannerContext,
    as_range,
    check_image_size,
    check_num_views,
    small_view_size,
)
from contrastlab.views.planners.random_resized import sample_resized_crop

__all__ = ["MultiCropPlanner"]


@register_planner("multicrop")
@dataclass(frozen=True)
class MultiCropPlanner(Planner):
    """SwAV multi-crop: ``num_large`` global crops, then ``num_small`` local crops (see the module docstring).

    Args:
        num_large: Number of large (global) views.
        num_small: Number of small (local) views; may be 0.
        large_scale: Area-fraction range of the large views.
        small_scale: Area-fraction range of the small views.
        ratio: Aspect-ratio range shared by all views.
        small_size: Side of the small views when rendered (0: half the large side, at least 8).
    """

    @dataclass
    class Settings:
        num_views: int = 2  #: number of large views
        num_small: int = 0  #: number of small views
        small_size: int = 0  #: side of the small views (0 = half the crop size)
        scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  #: area fraction range of the large views
        small_scale: list[float] = field(default_factory=lambda: [0.05, 0.14])  #: area range of the small views
        ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  #: aspect ratio range

    num_large: int = 2
    num_small: int = 6
    large_scale: tuple[float, float] = (0.14, 1.0)
    small_scale: tuple[float, float] = (0.05, 0.14)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    small_size: int = 0

    def __post_init__(self) -> None:
        check_num_views(self.num_large, "num_large")
        if isinstance(self.num_small, bool) or not isinstance(self.num_small, int) or self.num_small < 0:
            raise ConfigError(f"num_small must be a non-negative integer, got {self.num_small!r}")
        object.__setattr__(self, "large_scale", as_range(self.large_scale, "large_scale", 0.0, 1.0))
        object.__setattr__(self, "small_scale", as_range(self.small_scale, "small_scale", 0.0, 1.0))
        object.__setattr__(self, "ratio", as_range(self.ratio, "ratio", 0.0, math.inf))

    @classmethod
    def from_settings(cls, settings: Settings, context: PlannerContext) -> MultiCropPlanner:
        return cls(num_large=settings.num_views, num_small=settings.num_small, large_scale=tuple(settings.scale),
                   small_scale=tuple(settings.small_scale), ratio=tuple(settings.ratio),
                   small_size=settings.small_size)

    @classmethod
    def smoke_overrides(cls, small_input: bool) -> list[str]:
        return [f"views.small_size={8 if small_input else 16}"]

    @property
    def num_views(self) -> int:
        """Total number of views, large plus small."""
        return self.num_large + self.num_small

    def view_sizes(self, size: int) -> list[int]:
        """``size`` for the large views, the small side for the small ones."""
        small = small_view_size(size, self.small_size)
        return [size] * self.num_large + [small] * self.num_small

    def plan(self, index: int, width: int, height: int, generator: torch.Generator | None = None) -> list[Box]:
        """Return the large boxes followed by the small boxes."""
        check_image_size(width, height)
        large = [sample_resized_crop(width, height, self.large_scale, self.ratio, generator)
                 for _ in range(self.num_large)]
        small = [sample_resized_crop(width, height, self.small_scale, self.ratio, generator)
                 for _ in range(self.num_small)]
        return large + small

    def plan_batch(self, index: torch.Tensor, width: int | torch.Tensor, height: int | torch.Tensor,
                   generator: torch.Generator, *, store_table: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, num_views, 4]``: the large random resized crops, then the small ones."""
        w_img, h_img = bs.batch_arguments(index, width, height, generator)
        large = bs.random_resized(w_img, h_img, self.num_large, self.large_scale, self.ratio, generator)
        if self.num_small == 0:
            return large
        small = bs.random_resized(w_img, h_img, self.num_small, self.small_scale, self.ratio, generator)
        return torch.cat([large, small], dim=1)
