"""A crop law of your own: the second view is a local crop inside the first, global one.

Register it with ``contrastlab.register_planner`` and select it with ``views.planner=nested_crop``; its keys
(``views.scale``, ``views.inner``) come from its ``Settings``. Both laws are here side by side: ``plan`` for one
image (the CPU data-loading workers) and ``plan_batch`` for a batch on the device (the GPU input pipeline), built
from contrastlab's own samplers so that the two draw the same distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import contrastlab
from contrastlab.views.planners import Planner, PlannerContext, sample_resized_crop
from contrastlab.views.planners import batch_sampling as bs

RATIO = (3 / 4, 4 / 3)


@contrastlab.register_planner("nested_crop")
@dataclass(frozen=True)
class NestedCropPlanner(Planner):
    """View 0: a random resized crop of area ``scale``; view 1: a crop inside it whose sides are a fraction
    ``inner`` (uniform) of view 0's sides, at a uniform whole-pixel position."""

    @dataclass
    class Settings:
        scale: list[float] = field(default_factory=lambda: [0.4, 1.0])  #: area fraction of the outer view
        inner: list[float] = field(default_factory=lambda: [0.3, 0.7])  #: side fraction of the inner view

    scale: tuple[float, float] = (0.4, 1.0)
    inner: tuple[float, float] = (0.3, 0.7)
    num_views = 2

    def __post_init__(self) -> None:
        if not 0.0 < self.inner[0] <= self.inner[1] <= 1.0:
            raise contrastlab.ConfigError(f"views.inner must satisfy 0 < min <= max <= 1, got {self.inner!r}")

    @classmethod
    def from_settings(cls, settings: Settings, context: PlannerContext) -> NestedCropPlanner:
        return cls(scale=tuple(settings.scale), inner=tuple(settings.inner))

    def plan(self, index, width, height, generator=None):
        x0, y0, x1, y1 = sample_resized_crop(width, height, self.scale, RATIO, generator)
        fraction = torch.empty(1).uniform_(*self.inner, generator=generator).item()
        w, h = max(1, round(fraction * (x1 - x0))), max(1, round(fraction * (y1 - y0)))
        top = y0 + int(torch.randint(0, int(y1 - y0) - h + 1, (1,), generator=generator))
        left = x0 + int(torch.randint(0, int(x1 - x0) - w + 1, (1,), generator=generator))
        return [(x0, y0, x1, y1), (left, top, left + w, top + h)]

    def plan_batch(self, index, width, height, generator, *, store_table=None):
        w_img, h_img = bs.batch_arguments(index, width, height, generator)
        outer = bs.random_resized(w_img, h_img, 1, self.scale, RATIO, generator)[:, 0]  # [B, 4]
        ow, oh = outer[:, 2] - outer[:, 0], outer[:, 3] - outer[:, 1]
        fraction = bs.uniform((w_img.shape[0],), *self.inner, generator)
        w = torch.round(fraction * ow).clamp_min(1.0)
        h = torch.round(fraction * oh).clamp_min(1.0)
        top = outer[:, 1] + bs.uniform_offset(oh, h, generator)
        left = outer[:, 0] + bs.uniform_offset(ow, w, generator)
        return torch.stack([outer, bs.boxes_from(left, top, w, h)], dim=1)

    def label(self):
        return f"inner {self.inner[0]:g}-{self.inner[1]:g}"
