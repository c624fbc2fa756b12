"""ContrastiveCrop, SimCCrop and SemanticCrop: crops drawn around a per-image box.

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
interval and its integer truncation, as above, reproduced for the numbers that came from it. The localiser's
matching option gives upstream's box far edges, ``last index / size`` (``edges="released"`` in
:func:`~contrastlab.views.localiser.boxes_from_heatmaps`).

**SimCCrop** (upstream README, ``configs/small/*/moco_simccrop.py``): no localiser, a fixed central box of
half the height and width, ``init_box=(0.25, 0.25, 0.75, 0.75)``, read by the same planner
(:func:`simccrop_planner`).

**SemanticCrop** (PRCV 2023) -- a RECONSTRUCTION. Only the paper's abstract is public: a heatmap, a tuned
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
from dataclasses import dataclass

import torch

from contrastlab.errors import ConfigError
from contrastlab.views.box_store import BoxSource, ConstantBox
from contrastlab.views.boxes import Box
from contrastlab.views.planners import (
    _as_range,
    _check_image_size,
    _check_num_views,
    central_crop_box,
    sample_resized_crop,
)

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


@functools.lru_cache(maxsize=64)
def _log_ratio(ratio: tuple[float, float]) -> tuple[float, float]:
    log_ratio = torch.log(torch.tensor(ratio))  # float32, as torchvision
    return float(log_ratio[0]), float(log_ratio[1])


def _crop_size(
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


def place_crop_released(width: int, height: int, crop_width: int, crop_height: int, box: Box,
                        fx: float, fy: float) -> Box:
    """ContrastiveCrop's released placement (``ContrastiveCrop.get_params``): the crop's corner, not its centre.

    On each axis (rows shown; ``H`` the image height, ``h`` the crop height, ``y0, y1`` the box edges in pixels)
    the interval of top rows ``[a0, a1]`` has ends ``a = min(max(int(y) - h // 2, 0), H - h)``, each clamped into
    the image on its own, and the top row is ``a0 + int((a1 - a0) * fy)``: truncation, so the far end is never
    reached (upstream's float32 Beta sampler never returns 1; fractions are capped at the largest float32 below
    1 here too) and crops lean to the top-left: a whole-image box never lets a smaller crop touch the bottom or
    right border. Columns likewise with ``fx``.

    Example:
        >>> place_crop_released(32, 32, 10, 10, (0.0, 0.0, 32.0, 32.0), fx=0.999, fy=0.0)
        (21.0, 0.0, 31.0, 10.0)
    """
    def corner(side: int, crop: int, near: float, far: float, fraction: float) -> int:
        low = min(max(int(near) - crop // 2, 0), side - crop)
        high = min(max(int(far) - crop // 2, 0), side - crop)
        return low + int((high - low) * min(fraction, _BELOW_ONE))

    bx0, by0, bx1, by1 = box
    top = corner(height, crop_height, by0, by1, fy)
    left = corner(width, crop_width, bx0, bx1, fx)
    return (float(left), float(top), float(left + crop_width), float(top + crop_height))


def _check_store(store: object) -> None:
    if not isinstance(store, BoxSource):
        raise ConfigError(
            f"store must provide box(index, width, height) and enabled (a BoxStore or ConstantBox), "
            f"got {type(store).__name__}"
        )


@dataclass(frozen=True)
class ContrastiveCropPlanner:
    """ContrastiveCrop (Peng et al., CVPR 2022): crop centres ``Beta(alpha, alpha)``-distributed across a box.

    See the module docstring for the exact procedure and the fixed upstream clamp. While the store is
    disabled (``store.enabled`` False: upstream's warm-up epochs) every view is a plain random resized crop
    with the same ``scale`` and ``ratio`` (:func:`~contrastlab.views.planners.sample_resized_crop`).

    Args:
        store: Per-image boxes (:class:`~contrastlab.views.box_store.BoxStore`, refreshed by the localiser),
            or a :class:`~contrastlab.views.box_store.ConstantBox` (SimCCrop).
        alpha: Beta parameter: 0.1 on small datasets, 0.6 on ImageNet (released configs); 1 is uniform.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the crop aspect ratio (width / height).
        num_views: Number of views, each drawn independently.
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

    store: BoxSource
    alpha: float = ALPHA_SMALL
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    num_views: int = 2
    placement: str = "centre"

    def __post_init__(self) -> None:
        _check_store(self.store)
        _check_num_views(self.num_views)
        if self.placement not in CCROP_PLACEMENTS:
            raise ConfigError(f"placement must be one of {', '.join(CCROP_PLACEMENTS)}, got {self.placement!r}")
        alpha = float(self.alpha)
        if not (math.isfinite(alpha) and alpha > 0.0):
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "scale", _as_range(self.scale, "scale", 0.0, 1.0))
        object.__setattr__(self, "ratio", _as_range(self.ratio, "ratio", 0.0, math.inf))

    def plan(
        self, index: int, width: int, height: int, generator: torch.Generator | None = None
    ) -> list[Box]:
        """Return ``num_views`` boxes for sample ``index``, each drawn around the sample's stored box."""
        _check_image_size(width, height)
        if not self.store.enabled:
            return [
                sample_resized_crop(width, height, self.scale, self.ratio, generator)
                for _ in range(self.num_views)
            ]
        bx0, by0, bx1, by1 = self.store.box(index, width, height)
        boxes = []
        for _ in range(self.num_views):
            size = _crop_size(width, height, self.scale, self.ratio, generator)
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


@dataclass(frozen=True)
class SemanticCropPlanner:
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

    store: BoxSource
    suppression: float = 0.5
    push_apart: bool = True
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    num_views: int = 2

    def __post_init__(self) -> None:
        _check_store(self.store)
        _check_num_views(self.num_views)
        suppression = float(self.suppression)
        if not 0.0 <= suppression <= 1.0:
            raise ConfigError(f"suppression must be in [0, 1], got {self.suppression!r}")
        if not isinstance(self.push_apart, bool):
            raise ConfigError(f"push_apart must be true or false, got {self.push_apart!r}")
        object.__setattr__(self, "suppression", suppression)
        object.__setattr__(self, "scale", _as_range(self.scale, "scale", 0.0, 1.0))
        object.__setattr__(self, "ratio", _as_range(self.ratio, "ratio", 0.0, math.inf))

    def plan(
        self, index: int, width: int, height: int, generator: torch.Generator | None = None
    ) -> list[Box]:
        """Return ``num_views`` boxes for sample ``index`` around its stored (semantic) box."""
        _check_image_size(width, height)
        if not self.store.enabled:
            return [
                sample_resized_crop(width, height, self.scale, self.ratio, generator)
                for _ in range(self.num_views)
            ]
        bx0, by0, bx1, by1 = self.store.box(index, width, height)
        boxes: list[Box] = []
        previous = (0.5, 0.5)
        for view in range(self.num_views):
            size = _crop_size(width, height, self.scale, self.ratio, generator)
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


def simccrop_box() -> ConstantBox:
    """SimCCrop's store: the constant central box of half the height and width (:data:`SIMCCROP_BOX`)."""
    return ConstantBox(SIMCCROP_BOX)


def simccrop_planner(
    alpha: float = ALPHA_SMALL,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    num_views: int = 2,
    placement: str = "centre",
) -> ContrastiveCropPlanner:
    """SimCCrop (ContrastiveCrop's README): the ContrastiveCrop planner reading a fixed central box.

    No localiser and no warm-up (``configs/small/*/moco_simccrop.py``: ``warmup_epochs = 0``, the boxes are
    never updated), ``alpha = 0.1`` as released.

    Example:
        >>> simccrop_planner().store.box(0, 32, 32)
        (8.0, 8.0, 24.0, 24.0)
    """
    return ContrastiveCropPlanner(simccrop_box(), alpha=alpha, scale=scale, ratio=ratio, num_views=num_views,
                                  placement=placement)
