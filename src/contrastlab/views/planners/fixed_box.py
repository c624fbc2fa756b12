"""Fixed box (``views.planner=fixed``): the same box for every view, or the whole image (evaluation).

A given box is clipped to each image; an image it does not overlap raises ``ValueError``. No random numbers are
drawn, so the per-image and batched laws give the same boxes.

Example:
    >>> FixedBoxPlanner().plan(0, 32, 24)
    [(0.0, 0.0, 32.0, 24.0)]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from contrastlab.errors import ConfigError
from contrastlab.registry import register_planner
from contrastlab.views.boxes import Box, clip_box, validate_box, whole_image_box
from contrastlab.views.planners import batch_sampling as bs
from contrastlab.views.planners.base import Planner, check_image_size, check_num_views

__all__ = ["FixedBoxPlanner"]


@register_planner("fixed")
@dataclass(frozen=True)
class FixedBoxPlanner(Planner):
    """The same box for every view, or the whole image when ``box`` is None.

    Args:
        box: ``(x0, y0, x1, y1)`` in source pixels, or None for the whole image.
        num_views: Number of (identical) boxes returned.
    """

    @dataclass
    class Settings:
        num_views: int = 2  #: number of (identical) views of the whole image

    box: Box | None = None
    num_views: int = 1

    def __post_init__(self) -> None:
        check_num_views(self.num_views)
        if self.box is not None:
            try:
                object.__setattr__(self, "box", validate_box(self.box))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"FixedBoxPlanner box is invalid: {exc}") from exc

    def plan(self, index: int, width: int, height: int, generator: torch.Generator | None = None) -> list[Box]:
        """Return ``num_views`` copies of the (clipped) box; draws no random numbers."""
        check_image_size(width, height)
        if self.box is None:
            box = whole_image_box(width, height)
        else:
            box = clip_box(self.box, width, height)
            if not (box[0] < box[2] and box[1] < box[3]):
                raise ValueError(f"fixed box {self.box!r} lies outside the {width}x{height} image")
        return [box] * self.num_views

    def plan_batch(self, index: torch.Tensor, width: int | torch.Tensor, height: int | torch.Tensor,
                   generator: torch.Generator, *, store_table: torch.Tensor | None = None) -> torch.Tensor:
        """The fixed box clipped to each image, or the whole image; ``[B, V, 4]``.

        With int sizes a box outside the image raises ``ValueError`` as :meth:`plan` does; with tensor sizes that
        check would need the host, so it is not made.
        """
        w_img, h_img = bs.batch_arguments(index, width, height, generator)
        if self.box is None:
            box = bs.whole_image(w_img, h_img)
        else:
            if isinstance(width, int) and isinstance(height, int):
                x0, y0, x1, y1 = clip_box(self.box, width, height)  # host ints: the per-image check is free
                if not (x0 < x1 and y0 < y1):
                    raise ValueError(f"fixed box {self.box!r} lies outside the {width}x{height} image")
            zero = torch.zeros_like(w_img)
            box = torch.stack([torch.minimum(zero + max(edge, 0.0), side)
                               for edge, side in zip(self.box, (w_img, h_img, w_img, h_img))], dim=-1)
        return box[:, None, :].expand(-1, self.num_views, -1).contiguous()
