"""SemanticCrop (``views.planner=semantic_crop``): centre-suppressed crops around a semantic box.

SemanticCrop (PRCV 2023) -- a RECONSTRUCTION. Only the paper's abstract is public: a heatmap, a tuned
threshold and a centre-suppressed probabilistic sampling. What is built here is our reading of it, not the
authors' code. The heatmap and threshold are the localiser's (``localise(..., kind="mean_similarity",
threshold=k)`` for the more semantic map: cosine similarity of each location to the pooled feature). The
sampler (:class:`SemanticCropPlanner`) draws the centre fraction ``u`` on each axis, independently, from

    ``f_s(u) = (1 - s) + 2 s |2u - 1|``,  ``0 <= u <= 1``, suppression ``s`` in ``[0, 1]``,

a mixture of the uniform density (weight ``1 - s``) and the V-shaped density ``2 |2u - 1|`` (weight ``s``;
``u = 1/2 +- T/2`` with ``T ~ Beta(2, 1)``). Its value is ``1 - s`` at the box centre and ``1 + s`` at the box
edges: the centre density is suppressed by ``2 s`` relative to the edges (ratio ``(1 - s) / (1 + s)``);
``s = 0`` is uniform, ``s = 1`` gives zero density at the centre. CDF for ``u <= 1/2``:
``F(u) = (1 - s) u + s (2u - 2u^2)``, and ``F(u) = 1 - F(1 - u)`` above. With ``push_apart=True`` the
second view of each pair (views ``2k`` and ``2k + 1``) is drawn in the opposite half of the box on each
axis, i.e. the opposite quadrant: ``u' = 1/2 + sign * |v - 1/2|`` with ``v ~ f_s`` and ``sign = +1`` if the
first view's ``u < 1/2``, else ``-1``. Each view's marginal density stays ``f_s``.

The batched law draws the same fractions with tensor operations and places the crops as ContrastiveCrop's
batched law does (float64, snapped to whole pixels).

Example:
    >>> from contrastlab.views.box_store import BoxStore
    >>> planner = SemanticCropPlanner(BoxStore(10), suppression=0.8, push_apart=True)
    >>> len(planner.plan(0, 96, 96, torch.Generator().manual_seed(0)))
    2
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from contrastlab.errors import ConfigError
from contrastlab.registry import register_planner
from contrastlab.views.box_store import BoxSource
from contrastlab.views.boxes import Box
from contrastlab.views.planners.base import (
    Localisation,
    Planner,
    PlannerContext,
    as_range,
    check_image_size,
    check_num_views,
)
from contrastlab.views.planners.contrastive_crop import (
    LOCALISED_SMOKE,
    BoxSettings,
    check_store,
    crop_size,
    localised_store,
    place_crop,
    plan_around_box_batch,
)
from contrastlab.views.planners.random_resized import central_crop_box, sample_resized_crop

__all__ = ["SemanticCropPlanner", "sample_suppressed_fraction", "semantic_centre_density"]


def semantic_centre_density(u: float, suppression: float) -> float:
    """SemanticCrop's (reconstructed) centre density ``f_s(u) = (1 - s) + 2 s |2u - 1|`` on [0, 1]."""
    if not 0.0 <= u <= 1.0:
        return 0.0
    return (1.0 - suppression) + 2.0 * suppression * abs(2.0 * u - 1.0)


def sample_suppressed_fraction(suppression: float, generator: torch.Generator | None = None) -> float:
    """One centre fraction from :func:`semantic_centre_density` (three uniforms per draw).

    With probability ``s``: ``1/2 +- sqrt(V)/2`` (``sqrt(V) ~ Beta(2, 1)``, side by a fair coin); otherwise
    ``V`` itself (uniform).
    """
    choose, magnitude, side = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
    if choose < suppression:
        half = 0.5 * math.sqrt(magnitude)
        return 0.5 - half if side < 0.5 else 0.5 + half
    return magnitude


@register_planner("semantic_crop")
@dataclass(frozen=True)
class SemanticCropPlanner(Planner):
    """SemanticCrop (PRCV 2023), RECONSTRUCTED from its abstract: centre-suppressed sampling in a box.

    Not the authors' code (none is published). Crop sizes as ContrastiveCrop (upstream's random resized
    crop draw); the centre fraction across the stored box on each axis has the density
    ``f_s(u) = (1 - s) + 2 s |2u - 1|`` (``s = suppression``): ``1 - s`` at the box centre, ``1 + s`` at its
    edges. With ``push_apart`` the second view of each pair is drawn in the opposite quadrant of the box
    (each view's marginal stays ``f_s``). Placement clamps the crop into the image as ContrastiveCrop does.
    The semantic box comes from the localiser, e.g. ``localise(..., kind="mean_similarity", threshold=k)``
    with a threshold tuned per dataset. A disabled store gives plain random resized crops (warm-up).

    Args:
        store: Per-image boxes (a ``BoxStore`` the localiser fills) or a ``ConstantBox``.
        suppression: ``s`` in ``[0, 1]``: 0 uniform, 1 zero density at the box centre.
        push_apart: Draw views ``2k + 1`` in the quadrant opposite view ``2k``'s.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the crop aspect ratio (width / height).
        num_views: Number of views.

    Raises:
        ConfigError: Invalid ``suppression``, ranges, ``num_views`` or store.

    Example:
        >>> from contrastlab.views.box_store import BoxStore
        >>> planner = SemanticCropPlanner(BoxStore(10), suppression=0.8, push_apart=True)
        >>> len(planner.plan(0, 96, 96, torch.Generator().manual_seed(0)))
        2
    """

    @dataclass
    class Settings(BoxSettings):
        num_views: int = 2  #: number of views
        scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  #: crop area fraction range
        ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  #: crop aspect ratio range
        semantic_suppression: float = 0.5  #: crop-centre density 1 - s at the box centre, 1 + s at its edges
        semantic_push_apart: bool = True  #: the two views' centres in opposite quadrants of the box

    store: BoxSource
    suppression: float = 0.5
    push_apart: bool = True
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    num_views: int = 2
    localisation: Localisation | None = None

    def __post_init__(self) -> None:
        check_store(self.store)
        check_num_views(self.num_views)
        suppression = float(self.suppression)
        if not 0.0 <= suppression <= 1.0:
            raise ConfigError(f"suppression must be in [0, 1], got {self.suppression!r}")
        if not isinstance(self.push_apart, bool):
            raise ConfigError(f"push_apart must be true or false, got {self.push_apart!r}")
        object.__setattr__(self, "suppression", suppression)
        object.__setattr__(self, "scale", as_range(self.scale, "scale", 0.0, 1.0))
        object.__setattr__(self, "ratio", as_range(self.ratio, "ratio", 0.0, math.inf))

    @classmethod
    def from_settings(cls, settings: Settings, context: PlannerContext) -> SemanticCropPlanner:
        store, schedule = localised_store(settings, context)
        return cls(store, suppression=settings.semantic_suppression, push_apart=settings.semantic_push_apart,
                   scale=tuple(settings.scale), ratio=tuple(settings.ratio), num_views=settings.num_views,
                   localisation=schedule)

    @classmethod
    def smoke_overrides(cls, small_input: bool) -> list[str]:
        return list(LOCALISED_SMOKE)

    def label(self) -> str:
        return f"suppression {self.suppression:g}" + (", pushed apart" if self.push_apart else "")

    def plan(self, index: int, width: int, height: int, generator: torch.Generator | None = None) -> list[Box]:
        """Return ``num_views`` boxes for sample ``index`` around its stored (semantic) box."""
        check_image_size(width, height)
        if not self.store.enabled:
            return [
                sample_resized_crop(width, height, self.scale, self.ratio, generator)
                for _ in range(self.num_views)
            ]
        bx0, by0, bx1, by1 = self.store.box(index, width, height)
        boxes: list[Box] = []
        previous = (0.5, 0.5)
        for view in range(self.num_views):
            size = crop_size(width, height, self.scale, self.ratio, generator)
            fy = sample_suppressed_fraction(self.suppression, generator)
            fx = sample_suppressed_fraction(self.suppression, generator)
            if self.push_apart and view % 2 == 1:
                fy = 0.5 + (1.0 if previous[0] < 0.5 else -1.0) * abs(fy - 0.5)
                fx = 0.5 + (1.0 if previous[1] < 0.5 else -1.0) * abs(fx - 0.5)
            previous = (fy, fx)
            if size is None:
                boxes.append(central_crop_box(width, height, self.ratio))
                continue
            cx, cy = bx0 + fx * (bx1 - bx0), by0 + fy * (by1 - by0)
            boxes.append(place_crop(width, height, size[0], size[1], cx, cy))
        return boxes

    def plan_batch(self, index: torch.Tensor, width: int | torch.Tensor, height: int | torch.Tensor,
                   generator: torch.Generator, *, store_table: torch.Tensor | None = None) -> torch.Tensor:
        """Random resized crop sizes, centres at :func:`semantic_centre_density` fractions across the stored box
        (pushed apart per pair), placed in float64 and snapped to whole pixels; ``[B, V, 4]``."""
        return plan_around_box_batch(self, self._fractions_batch, index, width, height, generator, store_table)

    def _fractions_batch(self, batch: int, views: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        fy, fx = suppressed_fraction_batch(self.suppression, (2, batch, views), generator).unbind(0)
        if self.push_apart:
            fy, fx = push_apart_batch(fy), push_apart_batch(fx)
        return fy.double(), fx.double()


def suppressed_fraction_batch(suppression: float, size: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """Centre fractions of shape ``size`` with the density :func:`semantic_centre_density`, on the device."""
    choose, magnitude, side = torch.rand((3, *size), generator=generator, device=generator.device).unbind(0)
    half = 0.5 * torch.sqrt(magnitude)
    v_shaped = torch.where(side < 0.5, 0.5 - half, 0.5 + half)
    return torch.where(choose < suppression, v_shaped, magnitude)


def push_apart_batch(fraction: torch.Tensor) -> torch.Tensor:
    """Move view ``2k + 1``'s fraction ``[B, V]`` into the half opposite view ``2k``'s (``1/2 + sign |v - 1/2|``)."""
    pairs = fraction.shape[1] // 2
    if pairs == 0:
        return fraction
    first = fraction[:, 0 : 2 * pairs : 2]
    sign = torch.where(first < 0.5, 1.0, -1.0)
    out = fraction.clone()
    out[:, 1 : 2 * pairs : 2] = 0.5 + sign * (fraction[:, 1 : 2 * pairs : 2] - 0.5).abs()
    return out
