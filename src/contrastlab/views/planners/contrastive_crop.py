"""ContrastiveCrop and SimCCrop (``views.planner=contrastive_crop`` / ``simccrop``): crops drawn around a per-image box.

**ContrastiveCrop** (Peng, Wang, Zhu, You, "Crafting Better Contrastive Views for Siamese Representation
Learning", CVPR 2022, section 3.3, "center-suppressed sampling"). Each image has a box (the whole image at
first, later the box its own heatmap gives; :mod:`contrastlab.views.box_store`,
:mod:`contrastlab.views.localiser`). Each view's crop size is drawn as in a random resized crop and its
*centre* is drawn inside the box: on each axis, the centre lies at a ``Beta(alpha, alpha)`` fraction across
the box. ``alpha < 1`` pushes the centres of the two views towards opposite box edges, so they overlap less
(fewer false positives from near-identical views). The released configs use ``alpha = 0.1`` on the small
datasets (CIFAR, STL-10, Tiny-ImageNet) and ``0.6`` on ImageNet (:data:`ALPHA_SMALL`,
:data:`ALPHA_IMAGENET`), scale ``(0.2, 1)`` and ratio ``(3/4, 4/3)``.

Following upstream (``datasets/transforms/ContrastiveCrop.py``, ``ContrastiveCrop.get_params``): up to 10
attempts, each drawing an area fraction uniformly from ``scale`` and a log-uniform aspect ratio, exactly as
torchvision's ``RandomResizedCrop`` (same torch RNG calls, same rounding); the first size that fits is kept
and the centre fractions are drawn, vertical first, then horizontal; if no attempt fits, torchvision's
central fallback crop (the box is not used). Placement, the fixed clamp: the centre ``c = b0 + f (b1 - b0)``
(box edges ``b0, b1`` in pixels, ``f ~ Beta(alpha, alpha)``) puts the crop's near edge at ``c - s / 2``
(``s`` the crop side), which is then clamped to ``[0, L - s]`` (``L`` the image side) so the crop stays in
the image. Box coordinates are floats; the renderer snaps them to whole pixels (half up).

The upstream clamp and why it is replaced. Upstream clamps the two *ends* of the offset interval,
``ch0 = min(max(int(H * h0) - h // 2, 0), H - h)`` and likewise ``ch1`` from ``h1``, and then takes
``i = ch0 + int((ch1 - ch0) * beta)``:

1. ``int()`` truncates and ``beta < 1``, so the far end ``ch1`` is (almost surely) never reached: crops are
   shifted towards the top-left, and with the whole-image box a crop smaller than the image *never* touches
   the bottom or right border. Measured with upstream's own formula (32x32, ``alpha = 0.1``, whole-image
   box): 43% of the crops touch the top border, 0% the bottom one; with the fixed clamp, 46% and 45%.
   ``int(H * h0)`` also floors the box edges.
2. When one end is clamped, the Beta fraction is spread over the clamped interval instead of across the box,
   so the fraction ``f`` no longer marks where in the box the centre lies (``f = 0.5`` is not the box
   centre). Clamping the drawn position instead keeps the centre ``Beta(alpha, alpha)`` across the box
   whenever the crop fits around it, and otherwise moves the crop the least distance into the image.

**The released placement** (``placement="released"``, :func:`place_crop_released`; the recipes that reproduce
ContrastiveCrop's rows set ``views.ccrop_placement=released``): upstream's clamp of the two ends of the corner
interval and its integer truncation, as above, reproduced for the numbers that came from it, with upstream's
float32 arithmetic (the fraction a float32 and ``(ch1 - ch0) * beta`` a float32 product before ``int()``:
:func:`released_share`). The localiser's matching option gives upstream's box far edges, ``last index / size``
(``edges="released"`` in :func:`~contrastlab.views.localiser.boxes_from_heatmaps`); where a single row or column
passes the threshold that box has zero height or width (``y0 == y1`` or ``x0 == x1``), which the store keeps and
both placements read as upstream's arithmetic does: the released one gives ``ch0 == ch1``, so the crop's corner is
``ch0``; the centred one centres the crop on that line.

**SimCCrop** (upstream README, ``configs/small/*/moco_simccrop.py``): no localiser, a fixed central box of
half the height and width, ``init_box=(0.25, 0.25, 0.75, 0.75)``, read by the same planner
(:class:`SimCCropPlanner`).

The batched law (``plan_batch``, the GPU input pipeline) draws the same sizes with tensor operations and the Beta
fractions as ``sigmoid`` of a Gamma log-ratio (:mod:`~contrastlab.views.planners.batch_sampling`), then places
the crop in float64 and snaps it to whole pixels there, as the renderer would: in float32 a fraction close to 1
rounds to exactly 1 and a near edge ``x.5 - tiny`` to the tie ``x.5``, which the renderer rounds up, so with
``alpha = 0.1`` and a small box about 3% of float32 crops had their snapped centre half a pixel outside the box
(0.8% for the per-image law).

Randomness: ``generator=None`` draws from torch's global RNG (seeded per DataLoader worker). Beta and gamma
variates are drawn from torch uniforms and normals (Marsaglia and Tsang's method), so an explicit
``torch.Generator`` reproduces them; they follow the same law as upstream's ``torch.distributions.Beta``,
not the same numbers.

Example:
    >>> from contrastlab.views.box_store import BoxStore
    >>> store = BoxStore(100)  # one box per training image, the whole image at first
    >>> planner = ContrastiveCropPlanner(store, alpha=0.1)
    >>> len(planner.plan(index=3, width=32, height=32, generator=torch.Generator().manual_seed(0)))
    2
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from contrastlab.errors import ConfigError
from contrastlab.registry import register_planner
from contrastlab.views.box_store import BoxSource, BoxStore, ConstantBox
from contrastlab.views.boxes import Box
from contrastlab.views.planners import batch_sampling as bs
from contrastlab.views.planners.base import (
    Localisation,
    Planner,
    PlannerContext,
    as_range,
    check_image_size,
    check_num_views,
)
from contrastlab.views.planners.random_resized import central_crop_box, sample_resized_crop

ALPHA_SMALL = 0.1
"""Beta parameter of the released configs on CIFAR-10/100, STL-10 and Tiny-ImageNet."""

ALPHA_IMAGENET = 0.6
"""Beta parameter of the released configs on ImageNet-1K and ImageNet-200."""

SIMCCROP_BOX: tuple[float, float, float, float] = (0.25, 0.25, 0.75, 0.75)
"""SimCCrop's fixed normalised box: centred, half the height and half the width."""

_ATTEMPTS = 10  # as upstream and torchvision's RandomResizedCrop

_BELOW_ONE = 1.0 - 2.0**-24
"""The largest float32 below 1: the most upstream's float32 ``Beta.sample()`` returns (torch clamps it there)."""

CCROP_PLACEMENTS = ("centre", "released")
"""``centre``: the centre ``Beta(alpha, alpha)`` across the box, the crop moved the least way into the image
(:func:`place_crop`); ``released``: upstream's clamped corner interval and integer truncation
(:func:`place_crop_released`)."""


def _log_gamma_variate(shape: float, generator: torch.Generator | None) -> float:
    """``log X`` with ``X ~ Gamma(shape, 1)`` (Marsaglia and Tsang 2000; boosted by ``U^(1/shape)`` below 1).

    Each attempt takes four float64 uniforms in one torch call: two make the normal variate (Box-Muller),
    one the acceptance test, one the boost. Working in logs keeps tiny variates (shape 0.1 gives values
    far below 1e-30) exact enough.
    """
    boost = shape < 1.0
    d = (shape + 1.0 if boost else shape) - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        u1, u2, u3, u4 = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        x = math.sqrt(-2.0 * math.log1p(-u1)) * math.cos(2.0 * math.pi * u2)  # 1 - u1 in (0, 1]
        v = 1.0 + c * x
        if v <= 0.0:
            continue
        v = v * v * v
        if math.log1p(-u3) < 0.5 * x * x + d - d * v + d * math.log(v):
            break
    log_x = math.log(d * v)
    if boost:
        log_x += math.log1p(-u4) / shape
    return log_x


def sample_beta(a: float, b: float, generator: torch.Generator | None = None) -> float:
    """One ``Beta(a, b)`` variate, ``X / (X + Y)`` with ``X ~ Gamma(a)``, ``Y ~ Gamma(b)``, from torch's RNG.

    Args:
        a: First shape parameter, positive.
        b: Second shape parameter, positive.
        generator: RNG to draw from; ``None`` uses torch's global RNG.

    Example:
        >>> 0.0 <= sample_beta(0.1, 0.1, torch.Generator().manual_seed(0)) <= 1.0
        True
    """
    diff = _log_gamma_variate(b, generator) - _log_gamma_variate(a, generator)
    if diff > 700.0:
        return 0.0
    if diff < -700.0:
        return 1.0
    return 1.0 / (1.0 + math.exp(diff))


@functools.lru_cache(maxsize=64)
def _log_ratio(ratio: tuple[float, float]) -> tuple[float, float]:
    log_ratio = torch.log(torch.tensor(ratio))  # float32, as torchvision
    return float(log_ratio[0]), float(log_ratio[1])


def crop_size(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
) -> tuple[int, int] | None:
    """Upstream's (and torchvision's) size draw: ``(w, h)`` of the first of 10 fitting attempts, else None."""
    area = height * width
    log_lo, log_hi = _log_ratio(ratio)
    for _ in range(_ATTEMPTS):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=generator)).item()
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return w, h
    return None


def place_crop(width: int, height: int, crop_width: int, crop_height: int, cx: float, cy: float) -> Box:
    """The ``crop_width`` x ``crop_height`` box centred on ``(cx, cy)``, moved the least way into the image.

    The near edges ``cx - crop_width / 2`` and ``cy - crop_height / 2`` are clamped to
    ``[0, width - crop_width]`` and ``[0, height - crop_height]``; the crop must fit in the image.

    Example:
        >>> place_crop(32, 32, 10, 10, cx=30.0, cy=16.0)
        (22.0, 11.0, 32.0, 21.0)
    """
    left = min(max(cx - crop_width / 2.0, 0.0), float(width - crop_width))
    top = min(max(cy - crop_height / 2.0, 0.0), float(height - crop_height))
    return (left, top, left + crop_width, top + crop_height)


def released_share(span: int, fraction: float) -> int:
    """``int(span * fraction)`` as ContrastiveCrop's ``get_params`` computes it: the fraction a float32 below 1 (its
    ``Beta.sample()``), the product a float32 tensor (float32 times a Python int), then truncated.

    In float64 a product just below a whole number can fall one short of what upstream gets.

    Example:
        >>> released_share(6, 0.833333313), int(6 * 0.833333313)
        (5, 4)
    """
    return int(torch.tensor(fraction, dtype=torch.float32).clamp_max(_BELOW_ONE) * span)


def place_crop_released(width: int, height: int, crop_width: int, crop_height: int, box: Box,
                        fx: float, fy: float) -> Box:
    """ContrastiveCrop's released placement (``ContrastiveCrop.get_params``): the crop's corner, not its centre.

    On each axis (rows shown; ``H`` the image height, ``h`` the crop height, ``y0, y1`` the box edges in pixels)
    the interval of top rows ``[a0, a1]`` has ends ``a = min(max(int(y) - h // 2, 0), H - h)``, each clamped into
    the image on its own, and the top row is ``a0 + int((a1 - a0) * fy)``: truncation, so the far end is never
    reached (upstream's float32 Beta sampler never returns 1; fractions are capped at the largest float32 below
    1 here too) and crops lean to the top-left: a whole-image box never lets a smaller crop touch the bottom or
    right border. Columns likewise with ``fx``. As upstream (a float32 ``Beta.sample()`` times a Python int), the
    fraction is a float32 and the product ``(a1 - a0) * fy`` is rounded to float32 before the truncation
    (:func:`released_share`). A zero-height box (``y0 == y1``, the released edges of a single row) gives
    ``a0 == a1``: the crop's top row is ``a0`` whatever the fraction, as upstream.

    Example:
        >>> place_crop_released(32, 32, 10, 10, (0.0, 0.0, 32.0, 32.0), fx=0.999, fy=0.0)
        (21.0, 0.0, 31.0, 10.0)
    """
    def corner(side: int, crop: int, near: float, far: float, fraction: float) -> int:
        low = min(max(int(near) - crop // 2, 0), side - crop)
        high = min(max(int(far) - crop // 2, 0), side - crop)
        return low + released_share(high - low, fraction)

    bx0, by0, bx1, by1 = box
    top = corner(height, crop_height, by0, by1, fy)
    left = corner(width, crop_width, bx0, bx1, fx)
    return (float(left), float(top), float(left + crop_width), float(top + crop_height))


def check_store(store: object) -> None:
    if not isinstance(store, BoxSource):
        raise ConfigError(
            f"store must provide box(index, width, height) and enabled (a BoxStore or ConstantBox), "
            f"got {type(store).__name__}"
        )


@dataclass
class BoxSettings:
    """The config keys of a planner whose box store a localiser refreshes (ContrastiveCrop, SemanticCrop)."""

    box_warmup_epochs: int = 0  #: epochs of plain random crops before the first localisation
    box_update_every: int = 1  #: ... then localise every this many epochs
    box_threshold: float = 0.1  #: heatmap threshold of the localiser
    heatmap: Literal["channel_sum", "mean_similarity"] = "channel_sum"  #: channel_sum (ContrastiveCrop) | mean_similarity (SemanticCrop option)


def localised_store(settings: BoxSettings, context: PlannerContext,
                    edges: str = "exclusive") -> tuple[BoxStore, Localisation]:
    """A fresh box store of the run's images, off (plain crops) during the warm-up, and its schedule."""
    store = BoxStore(context.num_images, enabled=settings.box_warmup_epochs == 0)
    schedule = Localisation(warmup_epochs=settings.box_warmup_epochs, every=settings.box_update_every,
                            threshold=settings.box_threshold, heatmap=settings.heatmap, edges=edges)
    return store, schedule


LOCALISED_SMOKE = ["data.epoch_length=8", "train.epochs=2", "views.box_warmup_epochs=1", "views.box_update_every=1"]
"""``--smoke`` of a localised planner: two one-step epochs, so the localiser runs between them."""


def store_boxes_batch(store: object, index: torch.Tensor, width: torch.Tensor, height: torch.Tensor,
                store_table: torch.Tensor | None) -> torch.Tensor:
    """``[B, 4]`` float64 stored boxes in pixels, sanitised like :meth:`~contrastlab.views.box_store.BoxStore.box`."""
    w64, h64 = width.double(), height.double()
    if isinstance(store, ConstantBox):
        x0, y0, x1, y1 = store.normalised
        return torch.stack([x0 * w64, y0 * h64, x1 * w64, y1 * h64], dim=-1)
    if not isinstance(store, BoxStore):
        raise TypeError(f"plan_batch reads boxes from a BoxStore or a ConstantBox, got a {type(store).__name__} store")
    table = store.table.to(width.device) if store_table is None else store_table
    if table.dim() != 2 or table.shape[1] != 4:
        raise ValueError(f"store_table must have shape [N, 4], got {tuple(table.shape)}")
    rows = table[index].double().clamp(0.0, 1.0)  # NaN stays NaN and becomes the whole axis below
    x0, x1 = torch.minimum(rows[:, 0], rows[:, 2]), torch.maximum(rows[:, 0], rows[:, 2])
    y0, y1 = torch.minimum(rows[:, 1], rows[:, 3]), torch.maximum(rows[:, 1], rows[:, 3])
    empty_x, empty_y = ~(x0 <= x1), ~(y0 <= y1)  # NaN only: a zero-width box stays one
    x0, x1 = torch.where(empty_x, 0.0, x0), torch.where(empty_x, 1.0, x1)
    y0, y1 = torch.where(empty_y, 0.0, y0), torch.where(empty_y, 1.0, y1)
    return torch.stack([x0 * w64, y0 * h64, x1 * w64, y1 * h64], dim=-1)


def place_around_batch(w: torch.Tensor, h: torch.Tensor, fx: torch.Tensor, fy: torch.Tensor, box: torch.Tensor,
                 width: torch.Tensor, height: torch.Tensor) -> torch.Tensor:
    """Crops ``w x h [B, V]`` centred at fractions ``fx, fy`` (float64) across ``box [B, 4]`` (float64), clamped
    into the image as :func:`place_crop`, snapped to whole pixels (half up, as the renderer) in float64; float32."""
    bx0, by0, bx1, by1 = (edge[:, None] for edge in box.unbind(-1))
    w64, h64 = w.double(), h.double()
    cx = bx0 + fx * (bx1 - bx0)
    cy = by0 + fy * (by1 - by0)
    left = torch.minimum((cx - w64 / 2.0).clamp_min(0.0), width.double()[:, None] - w64)
    top = torch.minimum((cy - h64 / 2.0).clamp_min(0.0), height.double()[:, None] - h64)
    return bs.boxes_from(torch.floor(left + 0.5), torch.floor(top + 0.5), w64, h64).float()


def place_released_batch(w: torch.Tensor, h: torch.Tensor, fx: torch.Tensor, fy: torch.Tensor, box: torch.Tensor,
                         width: torch.Tensor, height: torch.Tensor) -> torch.Tensor:
    """ContrastiveCrop's released placement of crops ``w x h [B, V]`` (corner fractions ``fx, fy``), batched:
    :func:`place_crop_released` (each end of the corner interval ``int(edge) - side // 2`` clamped to
    ``[0, L - side]``, then ``low + int((high - low) * f)`` with ``f`` a float32 capped below 1 and the product in
    float32, as :func:`released_share`), the interval in float64; float32."""
    def corner(side: torch.Tensor, crop: torch.Tensor, near: torch.Tensor, far: torch.Tensor,
               fraction: torch.Tensor) -> torch.Tensor:
        limit = side.double()[:, None] - crop
        half = torch.floor(crop / 2.0)
        low = torch.minimum((torch.floor(near[:, None]) - half).clamp_min(0.0), limit)
        high = torch.minimum((torch.floor(far[:, None]) - half).clamp_min(0.0), limit)
        share = (high - low).float() * fraction.float().clamp_max(_BELOW_ONE)  # whole numbers: exact in float32
        return low + torch.floor(share).double()

    bx0, by0, bx1, by1 = box.unbind(-1)
    w64, h64 = w.double(), h.double()
    return bs.boxes_from(corner(width, w64, bx0, bx1, fx), corner(height, h64, by0, by1, fy), w64, h64).float()


def plan_around_box_batch(planner: Any, fractions: Any, index: torch.Tensor, width: int | torch.Tensor,
                          height: int | torch.Tensor, generator: torch.Generator, store_table: torch.Tensor | None,
                          place: Any = place_around_batch) -> torch.Tensor:
    """The batched law of a box-reading planner: random resized crop sizes, centres at the fractions that
    ``fractions(batch, views, generator) -> (fy, fx)`` (float64 ``[B, V]`` each) draws across the stored box,
    placed by ``place``; plain random resized crops while the store is disabled."""
    w_img, h_img = bs.batch_arguments(index, width, height, generator)
    views = planner.num_views
    if not planner.store.enabled:  # a host flag (shared memory), not a device tensor
        return bs.random_resized(w_img, h_img, views, planner.scale, planner.ratio, generator)
    box = store_boxes_batch(planner.store, index, w_img, h_img, store_table)
    batch = w_img.shape[0]
    fraction = bs.uniform((batch, views, bs.ATTEMPTS), planner.scale[0], planner.scale[1], generator)
    w, h, fits = bs.attempt_sizes(fraction, w_img, h_img, planner.ratio, generator)
    fy, fx = fractions(batch, views, generator)
    boxes = place(w, h, fx, fy, box, w_img, h_img)
    return torch.where(fits[..., None], boxes, bs.central_crop(w_img, h_img, planner.ratio)[:, None, :])


@register_planner("contrastive_crop")
@dataclass(frozen=True)
class ContrastiveCropPlanner(Planner):
    """ContrastiveCrop (Peng et al., CVPR 2022): crop centres ``Beta(alpha, alpha)``-distributed across a box.

    See the module docstring for the exact procedure and the fixed upstream clamp. While the store is
    disabled (``store.enabled`` False: upstream's warm-up epochs) every view is a plain random resized crop
    with the same ``scale`` and ``ratio`` (:func:`~contrastlab.views.planners.random_resized.sample_resized_crop`).

    Args:
        store: Per-image boxes (:class:`~contrastlab.views.box_store.BoxStore`, refreshed by the localiser),
            or a :class:`~contrastlab.views.box_store.ConstantBox` (SimCCrop).
        alpha: Beta parameter: 0.1 on small datasets, 0.6 on ImageNet (released configs); 1 is uniform.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the crop aspect ratio (width / height).
        num_views: Number of views, each drawn independently.
        localisation: When a localiser refreshes ``store`` (None: never, e.g. a constant box).
        placement: ``centre`` (default) or ``released`` (upstream's corner clamp and truncation), see
            :data:`CCROP_PLACEMENTS`.

    Raises:
        ConfigError: Invalid ``alpha``, ranges, ``num_views``, ``placement`` or store.

    Example:
        >>> from contrastlab.views.box_store import BoxStore
        >>> store = BoxStore(10)
        >>> store.update([4], torch.tensor([[0.5, 0.0, 1.0, 0.5]]))  # the object is top-right
        >>> boxes = ContrastiveCropPlanner(store).plan(4, 64, 64, torch.Generator().manual_seed(1))
        >>> all(0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 for x0, y0, x1, y1 in boxes)
        True
    """

    @dataclass
    class Settings(BoxSettings):
        num_views: int = 2  #: number of views
        scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  #: crop area fraction range
        ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  #: crop aspect ratio range
        ccrop_alpha: float = ALPHA_SMALL  #: Beta(alpha, alpha) crop centres (ImageNet: 0.6)
        ccrop_placement: Literal["centre", "released"] = "centre"  #: centre (the paper: centres across the box, crop moved into the image) | released (upstream: clamped corner interval, integer truncation, box far edges last index / size)

    store: BoxSource
    alpha: float = ALPHA_SMALL
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    num_views: int = 2
    localisation: Localisation | None = None
    placement: Literal["centre", "released"] = "centre"

    def __post_init__(self) -> None:
        check_store(self.store)
        check_num_views(self.num_views)
        if self.placement not in CCROP_PLACEMENTS:
            raise ConfigError(f"placement must be one of {', '.join(CCROP_PLACEMENTS)}, got {self.placement!r}")
        alpha = float(self.alpha)
        if not (math.isfinite(alpha) and alpha > 0.0):
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "scale", as_range(self.scale, "scale", 0.0, 1.0))
        object.__setattr__(self, "ratio", as_range(self.ratio, "ratio", 0.0, math.inf))

    @classmethod
    def from_settings(cls, settings: Settings, context: PlannerContext) -> ContrastiveCropPlanner:
        edges = "released" if settings.ccrop_placement == "released" else "exclusive"  # upstream's box far edges
        store, schedule = localised_store(settings, context, edges)
        return cls(store, alpha=settings.ccrop_alpha, scale=tuple(settings.scale), ratio=tuple(settings.ratio),
                   num_views=settings.num_views, localisation=schedule, placement=settings.ccrop_placement)

    @classmethod
    def smoke_overrides(cls, small_input: bool) -> list[str]:
        return list(LOCALISED_SMOKE)

    def label(self) -> str:
        return f"alpha {self.alpha:g}"

    def plan(self, index: int, width: int, height: int, generator: torch.Generator | None = None) -> list[Box]:
        """Return ``num_views`` boxes for sample ``index``, each drawn around the sample's stored box."""
        check_image_size(width, height)
        if not self.store.enabled:
            return [sample_resized_crop(width, height, self.scale, self.ratio, generator)
                    for _ in range(self.num_views)]
        bx0, by0, bx1, by1 = self.store.box(index, width, height)
        boxes = []
        for _ in range(self.num_views):
            size = crop_size(width, height, self.scale, self.ratio, generator)
            if size is None:
                boxes.append(central_crop_box(width, height, self.ratio))
                continue
            fy = sample_beta(self.alpha, self.alpha, generator)  # vertical first, as upstream (i, then j)
            fx = sample_beta(self.alpha, self.alpha, generator)
            if self.placement == "released":
                boxes.append(place_crop_released(width, height, size[0], size[1], (bx0, by0, bx1, by1), fx, fy))
                continue
            cx, cy = bx0 + fx * (bx1 - bx0), by0 + fy * (by1 - by0)
            boxes.append(place_crop(width, height, size[0], size[1], cx, cy))
        return boxes

    def plan_batch(self, index: torch.Tensor, width: int | torch.Tensor, height: int | torch.Tensor,
                   generator: torch.Generator, *, store_table: torch.Tensor | None = None) -> torch.Tensor:
        """Random resized crop sizes, centres at ``Beta(alpha, alpha)`` fractions across the stored box, placed in
        float64 and snapped to whole pixels (see the module docstring); ``[B, V, 4]``."""
        place = place_released_batch if self.placement == "released" else place_around_batch
        return plan_around_box_batch(self, self._beta_fractions_batch, index, width, height, generator, store_table,
                                     place)

    def _beta_fractions_batch(self, batch: int, views: int,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        logit = bs.beta_logit(self.alpha, self.alpha, (2, batch, views), generator)
        fy, fx = torch.sigmoid(logit.double()).unbind(0)
        return fy, fx


def simccrop_box() -> ConstantBox:
    """SimCCrop's store: the constant central box of half the height and width (:data:`SIMCCROP_BOX`)."""
    return ConstantBox(SIMCCROP_BOX)


@register_planner("simccrop")
@dataclass(frozen=True)
class SimCCropPlanner(ContrastiveCropPlanner):
    """SimCCrop (ContrastiveCrop's README): the ContrastiveCrop law around a fixed central box.

    No localiser and no warm-up (``configs/small/*/moco_simccrop.py``: ``warmup_epochs = 0``, the boxes are never
    updated), ``alpha = 0.1`` as released; the box is :data:`SIMCCROP_BOX`.

    Example:
        >>> SimCCropPlanner().store.box(0, 32, 32)
        (8.0, 8.0, 24.0, 24.0)
    """

    @dataclass
    class Settings:
        num_views: int = 2  #: number of views
        scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  #: crop area fraction range
        ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  #: crop aspect ratio range
        ccrop_alpha: float = ALPHA_SMALL  #: Beta(alpha, alpha) crop centres
        ccrop_placement: Literal["centre", "released"] = "centre"  #: centre | released (upstream's clamped corner interval and integer truncation)

    store: BoxSource = field(default_factory=simccrop_box)

    @classmethod
    def from_settings(cls, settings: Settings, context: PlannerContext) -> SimCCropPlanner:
        return cls(simccrop_box(), alpha=settings.ccrop_alpha, scale=tuple(settings.scale),
                   ratio=tuple(settings.ratio), num_views=settings.num_views, placement=settings.ccrop_placement)

    @classmethod
    def smoke_overrides(cls, small_input: bool) -> list[str]:
        return []
