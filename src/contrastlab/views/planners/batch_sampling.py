"""Tensor primitives of the batched crop laws: draws for a whole batch on the generator's device, no host sync.

The per-image laws draw one image at a time with Python control flow, which suits DataLoader workers. The
batched laws (each planner's ``plan_batch``) draw the same distributions for a batch already on the device,
without asking the host anything:

- no ``.item()``, ``.tolist()``, ``.cpu()``, no ``bool``/``int``/``float`` of a tensor, no ``nonzero`` or
  boolean-mask indexing, no shape or Python branch that depends on tensor values; every branch is on planner
  configuration (host Python numbers);
- loops of a fixed length are drawn as tensors: torchvision's 10 size attempts are a ``[B, V, 10]`` draw of which
  the first that fits is kept, the Gamma sampler's rejection loop is 12 proposal rounds.

Beta variates are ``X / (X + Y)`` for Gamma variates drawn by Marsaglia and Tsang's method (ACM TOMS 2000) in
log space, with the ``U^(1 / a)`` boost below shape 1, as the per-image
:func:`~contrastlab.views.planners.contrastive_crop.sample_beta`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["ATTEMPTS", "GAMMA_ROUNDS", "attempt_sizes", "batch_arguments", "beta_logit", "boxes_from", "central_crop",
           "image_side", "log_gamma", "place_uniform", "random_resized", "sample_beta_batch", "uniform",
           "uniform_offset", "whole_image"]

ATTEMPTS = 10
"""Size attempts per view, as torchvision's ``RandomResizedCrop`` and the per-image planners."""

GAMMA_ROUNDS = 12
"""Proposal rounds of the Gamma sampler; the first accepted proposal is kept (see :func:`log_gamma`)."""


def uniform(shape: Sequence[int], low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """Float32 uniforms on ``[low, high)`` of ``shape`` on the generator's device."""
    u = torch.rand(tuple(shape), generator=generator, device=generator.device)
    return low + (high - low) * u


def image_side(value: int | torch.Tensor, name: str, batch: int, device: torch.device) -> torch.Tensor:
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


def batch_arguments(index: torch.Tensor, width: int | torch.Tensor, height: int | torch.Tensor,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a ``plan_batch`` call's arguments; the image sides as float32 ``[B]`` tensors on the generator's device."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"plan_batch needs a torch.Generator, got {type(generator).__name__}")
    if not isinstance(index, torch.Tensor) or index.dim() != 1:
        raise ValueError("index must be a 1-D tensor of dataset indices")
    batch = index.shape[0]
    return (image_side(width, "width", batch, generator.device),
            image_side(height, "height", batch, generator.device))


def boxes_from(left: torch.Tensor, top: torch.Tensor, width: torch.Tensor, height: torch.Tensor) -> torch.Tensor:
    """Stack ``(x0, y0, x1, y1)`` from the near edges and the sides (any matching shapes)."""
    return torch.stack([left, top, left + width, top + height], dim=-1)


def whole_image(width: torch.Tensor, height: torch.Tensor) -> torch.Tensor:
    """``[B, 4]`` boxes of the whole images."""
    zero = torch.zeros_like(width)
    return torch.stack([zero, zero, width, height], dim=-1)


def central_crop(width: torch.Tensor, height: torch.Tensor, ratio: tuple[float, float]) -> torch.Tensor:
    """``[B, 4]`` :func:`~contrastlab.views.planners.random_resized.central_crop_box` boxes, exactly (float64)."""
    w_img, h_img = width.double(), height.double()
    low, high = min(ratio), max(ratio)
    in_ratio = w_img / h_img
    w = torch.where(in_ratio > high, torch.round(h_img * high), w_img)
    h = torch.where(in_ratio < low, torch.round(w_img / low), h_img)
    top = torch.floor((h_img - h) / 2.0)
    left = torch.floor((w_img - w) / 2.0)
    return boxes_from(left, top, w, h).float()


def attempt_sizes(
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
    log_aspect = uniform((batch, views, ATTEMPTS), math.log(ratio[0]), math.log(ratio[1]), generator)
    aspect = torch.exp(log_aspect)
    w_img, h_img = width[:, None, None], height[:, None, None]
    area = (w_img * h_img) * fraction
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
    attempt = torch.arange(ATTEMPTS, device=fraction.device)
    first = torch.where(fits, attempt, ATTEMPTS).amin(dim=-1, keepdim=True).clamp_(max=ATTEMPTS - 1)
    return w.gather(-1, first).squeeze(-1), h.gather(-1, first).squeeze(-1), fits.any(dim=-1)


def uniform_offset(extent: torch.Tensor, side: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """An integer uniform on ``0 .. extent - side`` per entry (``floor(U (extent - side + 1))``, clamped)."""
    room = (extent - side).clamp_min(0.0)
    u = torch.rand(room.shape, generator=generator, device=generator.device)
    return torch.minimum(torch.floor(u * (room + 1.0)), room)


def place_uniform(
    w: torch.Tensor, h: torch.Tensor, width: torch.Tensor, height: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """``[B, V, 4]`` boxes of sizes ``w, h [B, V]`` at uniform integer positions in their images."""
    top = uniform_offset(height[:, None], h, generator)
    left = uniform_offset(width[:, None], w, generator)
    return boxes_from(left, top, w, h)


def random_resized(
    width: torch.Tensor,
    height: torch.Tensor,
    views: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """``[B, views, 4]`` random resized crops (:func:`~contrastlab.views.planners.random_resized.sample_resized_crop`'s
    law)."""
    fraction = uniform((width.shape[0], views, ATTEMPTS), scale[0], scale[1], generator)
    w, h, fits = attempt_sizes(fraction, width, height, ratio, generator)
    boxes = place_uniform(w, h, width, height, generator)
    return torch.where(fits[..., None], boxes, central_crop(width, height, ratio)[:, None, :])


def log_gamma(shape: float, size: Sequence[int], generator: torch.Generator) -> torch.Tensor:
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


def beta_logit(a: float, b: float, size: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """``log X - log Y``, the logit of a ``Beta(a, b)`` variate (exact where float32 rounds the variate to 1)."""
    if not (a > 0.0 and b > 0.0):
        raise ValueError(f"Beta shape parameters must be positive, got a={a!r}, b={b!r}")
    return log_gamma(a, size, generator) - log_gamma(b, size, generator)


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
    return torch.sigmoid(beta_logit(a, b, size, generator))
