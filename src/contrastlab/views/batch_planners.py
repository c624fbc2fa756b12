"""Batched view planners: the boxes of every view of a whole batch at once, on the generator's device.

The per-image planners (:mod:`contrastlab.views.planners`, :mod:`contrastlab.views.joint_crop`,
:mod:`contrastlab.views.contrastive_crop`) draw one image at a time with Python control flow, which suits
DataLoader workers. A GPU input pipeline needs the same boxes for a batch of images already on the device,
without stopping the device to ask the host anything. :func:`plan_batch` draws, for every supported planner,
boxes with the **same distribution** as the planner's ``plan`` (not the same numbers: the random numbers are
drawn in another order and shape), using tensor operations only:

- no host synchronisation: no ``.item()``, ``.tolist()``, ``.cpu()``, no ``bool``/``int``/``float`` of a
  tensor, no ``nonzero`` or boolean-mask indexing, no shape or Python branch that depends on tensor values;
  every branch is on planner configuration (host Python numbers);
- loops of a fixed length are drawn as tensors: torchvision's 10 size attempts are a ``[B, V, 10]`` draw of
  which the first that fits is kept, the Gamma sampler's rejection loop is 12 proposal rounds.

The laws, planner by planner (see each planner's module for the papers and the reading of them):

- random resized crop (SimCLR, Chen et al. 2020; torchvision's ``RandomResizedCrop``): 10 attempts of an area
  fraction uniform on ``scale`` and a log-uniform aspect ratio, ``w = round(sqrt(A a))``,
  ``h = round(sqrt(A / a))``, the first that fits at a uniform integer position, else the central crop with the
  aspect ratio clamped to ``ratio``;
- multi-crop (SwAV, Caron et al. 2020): large random resized crops, then small ones;
- padded crop (He et al. 2016, section 4.2): the image's box shifted by integers uniform on ``[-p, p]``;
- fixed and centre boxes: deterministic, equal to the per-image planners';
- JointCrop(beta) (Zhang et al., AAAI 2025): the log area ratio from the beta family (truncated normal by
  inverting its CDF, uniform, or the reflected normal), the first area uniform given it, 10 aspect attempts per
  view with the area fixed, the ``fallback`` box when none fits, then ``num_small`` random resized crops;
- ContrastiveCrop (Peng et al., CVPR 2022) and SimCCrop: random resized crop sizes, centres at a
  ``Beta(alpha, alpha)`` fraction across the stored box, moved the least way into the image; a disabled store
  gives random resized crops;
- SemanticCrop (PRCV 2023, reconstructed): centre fractions from ``f_s(u) = (1 - s) + 2 s |2u - 1|``, the
  second view of each pair in the opposite half of the box on each axis with ``push_apart``;
- JointBlur (:func:`joint_blur_batch`): the JointCrop(beta) law on the blur sigmas.

Beta variates are ``X / (X + Y)`` for Gamma variates drawn by Marsaglia and Tsang's method (ACM TOMS 2000)
in log space, with the ``U^(1 / a)`` boost below shape 1, as :func:`~contrastlab.views.contrastive_crop.sample_beta`.

Example:
    >>> from contrastlab.views.planners import RandomResizedCropPlanner
    >>> g = torch.Generator().manual_seed(0)
    >>> plan_batch(RandomResizedCropPlanner(), torch.arange(8), 32, 32, g).shape
    torch.Size([8, 2, 4])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from contrastlab.views.box_store import BoxStore, ConstantBox
from contrastlab.views.boxes import clip_box
from contrastlab.views.contrastive_crop import ContrastiveCropPlanner, SemanticCropPlanner
from contrastlab.views.joint_blur import JointBlur
from contrastlab.views.joint_crop import JointCropPlanner, log_area_ratio_bound
from contrastlab.views.planners import (
    CenterCropPlanner,
    FixedBoxPlanner,
    MultiCropPlanner,
    PaddedCropPlanner,
    RandomResizedCropPlanner,
)

__all__ = ["SUPPORTED_PLANNERS", "joint_blur_batch", "plan_batch", "sample_area_pair_batch", "sample_beta_batch"]

SUPPORTED_PLANNERS: tuple[type, ...] = (
    RandomResizedCropPlanner,
    MultiCropPlanner,
    FixedBoxPlanner,
    CenterCropPlanner,
    PaddedCropPlanner,
    JointCropPlanner,
    ContrastiveCropPlanner,
    SemanticCropPlanner,
)
"""The planner types :func:`plan_batch` draws for."""

ATTEMPTS = 10
"""Size attempts per view, as torchvision's ``RandomResizedCrop`` and the per-image planners."""

GAMMA_ROUNDS = 12
"""Proposal rounds of the Gamma sampler; the first accepted proposal is kept (see :func:`_log_gamma`)."""


# ----------------------------------------------------------------------------- shared helpers


def _uniform(shape: Sequence[int], low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """Float32 uniforms on ``[low, high)`` of ``shape`` on the generator's device."""
    u = torch.rand(tuple(shape), generator=generator, device=generator.device)
    return low + (high - low) * u


def _image_side(value: int | torch.Tensor, name: str, batch: int, device: torch.device) -> torch.Tensor:
    """One image side per sample as a float32 ``[B]`` tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        side = value.to(device=device, dtype=torch.float32)
        if side.dim() == 0:
            return side.expand(batch)
        if tuple(side.shape) != (batch,):
            raise ValueError(f"{name} must be an int or a tensor of shape [{batch}], got shape {tuple(side.shape)}")
        return side
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or a tensor, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"image {name} must be positive, got {value}")
    return torch.full((batch,), value, dtype=torch.float32, device=device)


def _boxes(left: torch.Tensor, top: torch.Tensor, width: torch.Tensor, height: torch.Tensor) -> torch.Tensor:
    """Stack ``(x0, y0, x1, y1)`` from the near edges and the sides (any matching shapes)."""
    return torch.stack([left, top, left + width, top + height], dim=-1)


def _whole_image(width: torch.Tensor, height: torch.Tensor) -> torch.Tensor:
    """``[B, 4]`` boxes of the whole images."""
    zero = torch.zeros_like(width)
    return torch.stack([zero, zero, width, height], dim=-1)


def _central_crop(width: torch.Tensor, height: torch.Tensor, ratio: tuple[float, float]) -> torch.Tensor:
    """``[B, 4]`` :func:`~contrastlab.views.planners.central_crop_box` boxes, exactly (float64 arithmetic)."""
    w_img, h_img = width.double(), height.double()
    low, high = min(ratio), max(ratio)
    in_ratio = w_img / h_img
    w = torch.where(in_ratio > high, torch.round(h_img * high), w_img)
    h = torch.where(in_ratio < low, torch.round(w_img / low), h_img)
    top = torch.floor((h_img - h) / 2.0)
    left = torch.floor((w_img - w) / 2.0)
    return _boxes(left, top, w, h).float()


def _attempt_sizes(
    fraction: torch.Tensor,
    width: torch.Tensor,
    height: torch.Tensor,
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random resized crop sizes: the first of :data:`ATTEMPTS` attempts per view that fits.

    Each attempt draws a log-uniform aspect ratio ``a`` from ``ratio`` and takes
    ``(w, h) = (round(sqrt(A a)), round(sqrt(A / a)))`` for the area ``A`` (pixels) of ``fraction`` times the
    image area; it fits when ``0 < w <= width`` and ``0 < h <= height``.

    Args:
        fraction: Area fractions ``[B, V, ATTEMPTS]`` (one per attempt: random resized crop) or ``[B, V, 1]``
            (area fixed across the attempts: JointCrop).
        width: Image widths ``[B]``.
        height: Image heights ``[B]``.
        ratio: Aspect-ratio range (width / height).
        generator: RNG to draw the aspect ratios from.

    Returns:
        ``(w, h, fits)``, each ``[B, V]``: the first fitting attempt's size (an arbitrary attempt's where none
        fits) and whether any attempt fitted.
    """
    batch, views = fraction.shape[0], fraction.shape[1]
    log_aspect = _uniform((batch, views, ATTEMPTS), math.log(ratio[0]), math.log(ratio[1]), generator)
    aspect = torch.exp(log_aspect)
    w_img, h_img = width[:, None, None], height[:, None, None]
    area = (w_img * h_img) * fraction
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
    attempt = torch.arange(ATTEMPTS, device=fraction.device)
    first = torch.where(fits, attempt, ATTEMPTS).amin(dim=-1, keepdim=True).clamp_(max=ATTEMPTS - 1)
    return w.gather(-1, first).squeeze(-1), h.gather(-1, first).squeeze(-1), fits.any(dim=-1)


def _uniform_offset(extent: torch.Tensor, side: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """An integer uniform on ``0 .. extent - side`` per entry (``floor(U (extent - side + 1))``, clamped)."""
    room = (extent - side).clamp_min(0.0)
    u = torch.rand(room.shape, generator=generator, device=generator.device)
    return torch.minimum(torch.floor(u * (room + 1.0)), room)


def _place_uniform(
    w: torch.Tensor, h: torch.Tensor, width: torch.Tensor, height: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """``[B, V, 4]`` boxes of sizes ``w, h [B, V]`` at uniform integer positions in their images."""
    top = _uniform_offset(height[:, None], h, generator)
    left = _uniform_offset(width[:, None], w, generator)
    return _boxes(left, top, w, h)


def _random_resized(
    width: torch.Tensor,
    height: torch.Tensor,
    views: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """``[B, views, 4]`` random resized crops (:func:`~contrastlab.views.planners.sample_resized_crop`'s law)."""
    fraction = _uniform((width.shape[0], views, ATTEMPTS), scale[0], scale[1], generator)
    w, h, fits = _attempt_sizes(fraction, width, height, ratio, generator)
    boxes = _place_uniform(w, h, width, height, generator)
    return torch.where(fits[..., None], boxes, _central_crop(width, height, ratio)[:, None, :])


def _log_gamma(shape: float, size: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """``log X`` with ``X ~ Gamma(shape, 1)``, a ``size`` tensor (Marsaglia and Tsang 2000, vectorised).

    All :data:`GAMMA_ROUNDS` proposals are drawn at once and the first accepted one is kept. A proposal is
    accepted with probability above 0.95 for the shapes ``>= 1`` the method runs on (below 1 it runs on
    ``shape + 1`` and multiplies by ``U^(1 / shape)``), so all 12 are rejected with probability below
    ``0.05^12 ~ 2e-16`` per variate; the last proposal is used then (a negligible bias). Logs keep tiny variates
    (shape 0.1 gives values far below 1e-30) exact enough.
    """
    device = generator.device
    boost = shape < 1.0
    d = (shape + 1.0 if boost else shape) - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    rounds = (GAMMA_ROUNDS, *size)
    x = torch.randn(rounds, generator=generator, device=device)
    u = torch.rand(rounds, generator=generator, device=device)
    v = 1.0 + c * x
    positive = v > 0.0
    v3 = torch.where(positive, v, 1.0) ** 3
    accept = positive & (torch.log1p(-u) < 0.5 * x * x + d - d * v3 + d * torch.log(v3))
    index = torch.arange(GAMMA_ROUNDS, device=device).view(GAMMA_ROUNDS, *([1] * len(size)))
    first = torch.where(accept, index, GAMMA_ROUNDS - 1).amin(dim=0, keepdim=True)
    log_x = math.log(d) + torch.log(v3.gather(0, first).squeeze(0))
    if boost:
        boost_u = torch.rand(tuple(size), generator=generator, device=device)
        log_x = log_x + torch.log1p(-boost_u) / shape  # 1 - U in (0, 1]
    return log_x


def sample_beta_batch(a: float, b: float, size: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """``Beta(a, b)`` variates of shape ``size`` on the generator's device, without host synchronisation.

    ``X / (X + Y)`` for ``X ~ Gamma(a)``, ``Y ~ Gamma(b)``, computed as ``sigmoid(log X - log Y)``.

    Args:
        a: First shape parameter, positive.
        b: Second shape parameter, positive.
        size: Shape of the result.
        generator: RNG to draw from (its device is the result's).

    Example:
        >>> x = sample_beta_batch(0.1, 0.1, (4, 2), torch.Generator().manual_seed(0))
        >>> tuple(x.shape), bool(((x >= 0) & (x <= 1)).all())
        ((4, 2), True)
    """
    return torch.sigmoid(_beta_logit(a, b, size, generator))


def _beta_logit(a: float, b: float, size: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """``log X - log Y``, the logit of a ``Beta(a, b)`` variate (exact where float32 rounds the variate to 1)."""
    if not (a > 0.0 and b > 0.0):
        raise ValueError(f"Beta shape parameters must be positive, got a={a!r}, b={b!r}")
    return _log_gamma(a, size, generator) - _log_gamma(b, size, generator)


def _log_ratio(beta: float, bound: float, size: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """JointCrop's log ratio ``r`` on ``[-bound, bound]`` (the beta family; one uniform per variate).

    For ``beta != 0`` the truncated normal is drawn by inverting its CDF: with ``u`` uniform, the CPU planner's
    ``p = 1/2 + (u - 1/2) Z`` (``Z = erf(|beta| / sqrt 2)``) is written through its lower tail,
    ``min(p, 1 - p) = (1 - Z) / 2 + Z min(u, 1 - u)``, so float32 keeps the tails accurate.
    """
    if beta == 0.0 or bound == 0.0:
        return _uniform(size, -bound, bound, generator)
    u = torch.rand(tuple(size), generator=generator, device=generator.device)
    z = math.erf(abs(beta) / math.sqrt(2.0))
    tail = 0.5 * math.erfc(abs(beta) / math.sqrt(2.0))
    sigma = bound / abs(beta)
    lower = torch.special.ndtri(tail + z * torch.minimum(u, 1.0 - u))  # <= 0
    x = torch.where(u < 0.5, sigma * lower, -sigma * lower).clamp(-bound, bound)
    if beta < 0:
        # Reflect each half towards its edge, as the CPU planner.
        x = torch.where(x < 0, -bound - x, bound - x)
    return x


def sample_area_pair_batch(
    beta: float, bound: float, scale: tuple[float, float], size: Sequence[int], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """JointCrop(beta)'s ``(r, s1, s2)`` of shape ``size``: :func:`~contrastlab.views.joint_crop.sample_area_pair`.

    Args:
        beta: Shape of the log-ratio law (0 uniform, > 0 truncated normal, < 0 reflected normal).
        bound: ``L``, the bound on ``|r|`` (``JointCropPlanner.log_ratio_bound``).
        scale: ``(smin, smax)``.
        size: Shape of each result.
        generator: RNG to draw from.

    Returns:
        The log ratio ``r``, the first area fraction ``s1 ~ U[max(smin, smin e^-r), min(smax, smax e^-r)]``
        and ``s2 = s1 e^r``.
    """
    log_ratio = _log_ratio(beta, bound, size, generator)
    ratio = torch.exp(log_ratio)
    low = torch.clamp_min(scale[0] / ratio, scale[0])
    high = torch.maximum(low, torch.clamp_max(scale[1] / ratio, scale[1]))
    first = low + (high - low) * torch.rand(tuple(size), generator=generator, device=generator.device)
    return log_ratio, first, first * ratio


def _suppressed_fraction(suppression: float, size: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """SemanticCrop's centre fractions (density ``(1 - s) + 2 s |2u - 1|``) of shape ``size``."""
    choose, magnitude, side = torch.rand((3, *size), generator=generator, device=generator.device).unbind(0)
    half = 0.5 * torch.sqrt(magnitude)
    v_shaped = torch.where(side < 0.5, 0.5 - half, 0.5 + half)
    return torch.where(choose < suppression, v_shaped, magnitude)


def _push_apart(fraction: torch.Tensor) -> torch.Tensor:
    """Move view ``2k + 1``'s fraction ``[B, V]`` into the half opposite view ``2k``'s (``1/2 + sign |v - 1/2|``)."""
    pairs = fraction.shape[1] // 2
    if pairs == 0:
        return fraction
    first = fraction[:, 0 : 2 * pairs : 2]
    sign = torch.where(first < 0.5, 1.0, -1.0)
    out = fraction.clone()
    out[:, 1 : 2 * pairs : 2] = 0.5 + sign * (fraction[:, 1 : 2 * pairs : 2] - 0.5).abs()
    return out


def _store_boxes(
    store: object,
    index: torch.Tensor,
    width: torch.Tensor,
    height: torch.Tensor,
    store_table: torch.Tensor | None,
) -> torch.Tensor:
    """``[B, 4]`` stored boxes in pixels, sanitised like :meth:`~contrastlab.views.box_store.BoxStore.box`."""
    if isinstance(store, ConstantBox):
        x0, y0, x1, y1 = store.normalised
        return torch.stack([x0 * width, y0 * height, x1 * width, y1 * height], dim=-1)
    if not isinstance(store, BoxStore):
        raise TypeError(
            f"plan_batch reads boxes from a BoxStore or a ConstantBox, got a {type(store).__name__} store"
        )
    table = store.table.to(width.device) if store_table is None else store_table
    if table.dim() != 2 or table.shape[1] != 4:
        raise ValueError(f"store_table must have shape [N, 4], got {tuple(table.shape)}")
    rows = table[index].to(torch.float32).clamp(0.0, 1.0)  # NaN stays NaN and becomes the whole axis below
    x0, x1 = torch.minimum(rows[:, 0], rows[:, 2]), torch.maximum(rows[:, 0], rows[:, 2])
    y0, y1 = torch.minimum(rows[:, 1], rows[:, 3]), torch.maximum(rows[:, 1], rows[:, 3])
    empty_x, empty_y = ~(x0 < x1), ~(y0 < y1)
    x0, x1 = torch.where(empty_x, 0.0, x0), torch.where(empty_x, 1.0, x1)
    y0, y1 = torch.where(empty_y, 0.0, y0), torch.where(empty_y, 1.0, y1)
    return torch.stack([x0 * width, y0 * height, x1 * width, y1 * height], dim=-1)


def _place_around(
    w: torch.Tensor,
    h: torch.Tensor,
    fx: torch.Tensor,
    fy: torch.Tensor,
    box: torch.Tensor,
    width: torch.Tensor,
    height: torch.Tensor,
) -> torch.Tensor:
    """Crops ``w x h [B, V]`` centred at fractions ``fx, fy`` across ``box [B, 4]``, clamped into the image.

    :func:`~contrastlab.views.contrastive_crop.place_crop`: near edge ``c - s / 2`` clamped to ``[0, L - s]``.
    """
    bx0, by0, bx1, by1 = (edge[:, None] for edge in box.unbind(-1))
    cx = bx0 + fx * (bx1 - bx0)
    cy = by0 + fy * (by1 - by0)
    left = torch.minimum((cx - w / 2.0).clamp_min(0.0), width[:, None] - w)
    top = torch.minimum((cy - h / 2.0).clamp_min(0.0), height[:, None] - h)
    return _boxes(left, top, w, h)


def _place_released(
    w: torch.Tensor,
    h: torch.Tensor,
    fx: torch.Tensor,
    fy: torch.Tensor,
    box: torch.Tensor,
    width: torch.Tensor,
    height: torch.Tensor,
) -> torch.Tensor:
    """ContrastiveCrop's released placement of crops ``w x h [B, V]`` (corner fractions ``fx, fy``), batched.

    :func:`~contrastlab.views.contrastive_crop.place_crop_released`: each end of the corner interval
    ``int(edge) - side // 2`` clamped to ``[0, L - side]``, then ``low + int((high - low) * f)``, ``f`` capped
    below 1 as upstream's float32 Beta sampler is (float32 rounds about a tenth of Beta(0.1, 0.1) draws to 1).
    """
    def corner(side: torch.Tensor, crop: torch.Tensor, near: torch.Tensor, far: torch.Tensor,
               fraction: torch.Tensor) -> torch.Tensor:
        limit = side[:, None] - crop
        low = torch.minimum((torch.floor(near[:, None]) - torch.floor(crop / 2.0)).clamp_min(0.0), limit)
        high = torch.minimum((torch.floor(far[:, None]) - torch.floor(crop / 2.0)).clamp_min(0.0), limit)
        return low + torch.floor((high - low) * fraction.clamp_max(1.0 - 2.0**-24))

    bx0, by0, bx1, by1 = box.unbind(-1)
    return _boxes(corner(width, w, bx0, bx1, fx), corner(height, h, by0, by1, fy), w, h)


# ----------------------------------------------------------------------------- planners


def _plan_fixed(planner: FixedBoxPlanner, width: torch.Tensor, height: torch.Tensor) -> torch.Tensor:
    """The fixed box clipped to each image, or the whole image; ``[B, V, 4]``."""
    if planner.box is None:
        box = _whole_image(width, height)
    else:
        zero = torch.zeros_like(width)
        box = torch.stack([
            torch.minimum(zero + max(edge, 0.0), side)
            for edge, side in zip(planner.box, (width, height, width, height))
        ], dim=-1)
    return box[:, None, :].expand(-1, planner.num_views, -1).contiguous()


def _plan_center(planner: CenterCropPlanner, width: torch.Tensor, height: torch.Tensor) -> torch.Tensor:
    """The centred square of :class:`~contrastlab.views.planners.CenterCropPlanner`, exactly (float64)."""
    w_img, h_img = width.double(), height.double()
    side = torch.round(planner.crop_fraction * torch.minimum(w_img, h_img)).clamp_min(1.0)
    top = torch.round((h_img - side) / 2.0)
    left = torch.round((w_img - side) / 2.0)
    box = _boxes(left, top, side, side).float()
    return box[:, None, :].expand(-1, planner.num_views, -1).contiguous()


def _plan_padded(
    planner: PaddedCropPlanner, width: torch.Tensor, height: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """The image's box shifted by integers uniform on ``[-p, p]`` (top, then left); may leave the image."""
    p = planner.padding
    shift = torch.randint(0, 2 * p + 1, (width.shape[0], planner.num_views, 2), generator=generator,
                          device=generator.device).to(torch.float32) - p
    w = width[:, None].expand(-1, planner.num_views)
    h = height[:, None].expand(-1, planner.num_views)
    return _boxes(shift[..., 1], shift[..., 0], w, h)


def _plan_joint_crop(
    planner: JointCropPlanner, width: torch.Tensor, height: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """JointCrop(beta)'s pair, each view's area fixed across its attempts, then the small views."""
    batch = width.shape[0]
    _, first, second = sample_area_pair_batch(planner.beta, planner.log_ratio_bound, planner.scale, (batch,),
                                              generator)
    fraction = torch.stack([first, second], dim=1)[..., None]  # [B, 2, 1]: the area is fixed per view
    w, h, fits = _attempt_sizes(fraction, width, height, planner.ratio, generator)
    boxes = _place_uniform(w, h, width, height, generator)
    if planner.fallback == "whole_image":
        fallback = _whole_image(width, height)
    else:
        fallback = _central_crop(width, height, planner.ratio)
    boxes = torch.where(fits[..., None], boxes, fallback[:, None, :])
    if planner.num_small == 0:
        return boxes
    small = _random_resized(width, height, planner.num_small, planner.small_scale, planner.ratio, generator)
    return torch.cat([boxes, small], dim=1)


def _plan_around_box(
    planner: ContrastiveCropPlanner | SemanticCropPlanner,
    index: torch.Tensor,
    width: torch.Tensor,
    height: torch.Tensor,
    generator: torch.Generator,
    store_table: torch.Tensor | None,
) -> torch.Tensor:
    """ContrastiveCrop and SemanticCrop: random resized crop sizes, centres drawn across the stored box."""
    views = planner.num_views
    if not planner.store.enabled:  # a host flag (shared memory), not a device tensor
        return _random_resized(width, height, views, planner.scale, planner.ratio, generator)
    box = _store_boxes(planner.store, index, width, height, store_table)
    batch = width.shape[0]
    fraction = _uniform((batch, views, ATTEMPTS), planner.scale[0], planner.scale[1], generator)
    w, h, fits = _attempt_sizes(fraction, width, height, planner.ratio, generator)
    if isinstance(planner, ContrastiveCropPlanner):
        fy, fx = sample_beta_batch(planner.alpha, planner.alpha, (2, batch, views), generator).unbind(0)
    else:
        fy, fx = _suppressed_fraction(planner.suppression, (2, batch, views), generator).unbind(0)
        if planner.push_apart:
            fy, fx = _push_apart(fy), _push_apart(fx)
    if getattr(planner, "placement", "centre") == "released":
        boxes = _place_released(w, h, fx, fy, box, width, height)
    else:
        boxes = _place_around(w, h, fx, fy, box, width, height)
    return torch.where(fits[..., None], boxes, _central_crop(width, height, planner.ratio)[:, None, :])


def plan_batch(
    planner: object,
    index: torch.Tensor,
    width: int | torch.Tensor,
    height: int | torch.Tensor,
    generator: torch.Generator,
    *,
    store_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boxes ``[B, V, 4]`` float32 (x0, y0, x1, y1 in source pixels) on generator.device for samples ``index``.

    Same distribution as ``planner.plan`` called once per sample, drawn with tensor operations only and no host
    synchronisation (see the module docstring). Boxes are integer-valued where the planner's are (all but
    ContrastiveCrop and SemanticCrop).

    Args:
        planner: One of :data:`SUPPORTED_PLANNERS`.
        index: Dataset indices of the samples, ``[B]`` long, on the generator's device (read by the box-store
            planners only).
        width: Image width: an int (every image the same size) or a ``[B]`` tensor on the device.
        height: Image height, likewise.
        generator: RNG of every draw; the boxes live on its device.
        store_table: The box store's table already on the device (ContrastiveCrop, SemanticCrop with a
            ``BoxStore``); refresh it after the store changes. None copies ``store.table`` to the device on each
            call (a host-to-device copy).

    Returns:
        ``[B, planner.num_views, 4]`` float32 boxes. Views are in the planner's order (multi-crop: the large
        views first). Padded crops may leave the image; every other box lies inside its own image.

    Raises:
        TypeError: The planner type is not supported, or an argument has the wrong type.
        ValueError: Bad shapes or sizes; a fixed box outside an image of int size (with tensor sizes that
            check would need the host, so it is not made).

    Example:
        >>> from contrastlab.views.planners import CenterCropPlanner
        >>> plan_batch(CenterCropPlanner(), torch.arange(2), 32, 32, torch.Generator()).tolist()
        [[[2.0, 2.0, 30.0, 30.0]], [[2.0, 2.0, 30.0, 30.0]]]
    """
    if not isinstance(planner, SUPPORTED_PLANNERS):
        names = ", ".join(kind.__name__ for kind in SUPPORTED_PLANNERS)
        raise TypeError(f"plan_batch does not support {type(planner).__name__}; supported planners: {names}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"plan_batch needs a torch.Generator, got {type(generator).__name__}")
    if not isinstance(index, torch.Tensor) or index.dim() != 1:
        raise ValueError("index must be a 1-D tensor of dataset indices")
    device = generator.device
    batch = index.shape[0]
    w_img = _image_side(width, "width", batch, device)
    h_img = _image_side(height, "height", batch, device)
    if isinstance(planner, RandomResizedCropPlanner):
        return _random_resized(w_img, h_img, planner.num_views, planner.scale, planner.ratio, generator)
    if isinstance(planner, MultiCropPlanner):
        large = _random_resized(w_img, h_img, planner.num_large, planner.large_scale, planner.ratio, generator)
        if planner.num_small == 0:
            return large
        small = _random_resized(w_img, h_img, planner.num_small, planner.small_scale, planner.ratio, generator)
        return torch.cat([large, small], dim=1)
    if isinstance(planner, FixedBoxPlanner):
        if planner.box is not None and isinstance(width, int) and isinstance(height, int):
            x0, y0, x1, y1 = clip_box(planner.box, width, height)  # host ints: the CPU planner's check is free
            if not (x0 < x1 and y0 < y1):
                raise ValueError(f"fixed box {planner.box!r} lies outside the {width}x{height} image")
        return _plan_fixed(planner, w_img, h_img)
    if isinstance(planner, CenterCropPlanner):
        return _plan_center(planner, w_img, h_img)
    if isinstance(planner, PaddedCropPlanner):
        return _plan_padded(planner, w_img, h_img, generator)
    if isinstance(planner, JointCropPlanner):
        return _plan_joint_crop(planner, w_img, h_img, generator)
    return _plan_around_box(planner, index, w_img, h_img, generator, store_table)


def joint_blur_batch(joint_blur: JointBlur, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """JointBlur's per-pair decision and sigmas for a batch (:class:`~contrastlab.views.joint_blur.JointBlur`).

    Args:
        joint_blur: The JointBlur configuration.
        batch: Number of pairs ``B``.
        generator: RNG of every draw; the results live on its device.

    Returns:
        ``use_joint [B]`` bool (all True in mode ``always``, a fair coin in ``either``) and ``sigmas [B, 2]``
        float32: the JointCrop(beta) law on ``(sigma_min / sigma_max, 1)`` scaled by ``sigma_max``, the second
        sigma clamped to at most ``sigma_max``.

    Example:
        >>> use, sigmas = joint_blur_batch(JointBlur(), 4, torch.Generator().manual_seed(0))
        >>> tuple(use.shape), tuple(sigmas.shape)
        ((4,), (4, 2))
    """
    device = generator.device
    if joint_blur.mode == "always":
        use_joint = torch.ones(batch, dtype=torch.bool, device=device)
    else:
        use_joint = torch.rand(batch, generator=generator, device=device) < 0.5
    low, high = joint_blur.sigma
    scale = (low / high, 1.0)
    bound = log_area_ratio_bound(scale, joint_blur.epsilon)
    _, first, second = sample_area_pair_batch(joint_blur.beta, bound, scale, (batch,), generator)
    sigmas = torch.stack([first * high, torch.clamp_max(second * high, high)], dim=1)
    return use_joint, sigmas
