"""The batched renderer: every view of a batch cropped, resized and augmented in a few tensor ops on the device.

The CPU renderer (:mod:`contrastlab.views.render`, :mod:`contrastlab.views.photometric`) handles one PIL image at
a time in DataLoader workers. This module renders a whole batch at once, with per-sample random parameters drawn
from a seeded generator on the batch's device, and never reads a value back to the host (no ``.item()``, no
data-dependent shapes), so a GPU step can be queued while the previous one runs.

**Crop + resize as two matrix products.** torchvision's ``resized_crop(..., antialias=True)`` and PIL's bilinear
resize (the CPU path) are separable: each output row is a weighted sum of source rows, with triangle weights
``max(0, 1 - |j + 1/2 - c| / s)`` centred on ``c = (i + 1/2) L / S`` (``L`` the crop side, ``S`` the view side,
``s = max(1, L / S)`` widening the triangle when downsampling: the antialias), restricted to the crop and
normalised per output pixel. Building those weights per sample as matrices ``Ry [B, S, H]`` and ``Rx [B, S, W]``
turns the crop and the resize of the whole batch into ``Ry @ image @ Rx^T`` (two batched matmuls), for any
per-sample box. A horizontal flip is the reversed ``Rx`` (free), and crop taps outside the image (the zero
padding of ``RandomCrop(padding=p)``) keep their weight in the normalisation and contribute zero.

**Photometric ops** follow torchvision's tensor functional ops (``torchvision.transforms.functional``) formula for
formula: brightness, contrast and saturation are blends ``clamp(f x + (1 - f) y, 0, 1)`` with ``y`` black, the mean
of the grayscale image, or the grayscale image; hue shifts the H of HSV; grayscale is ``0.2989 R + 0.587 G +
0.114 B``; Gaussian blur uses torchvision's kernel and reflect padding, as a per-sample matrix ``G [B, S, S]``
applied as ``G x G^T``; solarisation inverts pixels ``>= t / 255``. Colour jitter applies its four ops in a random
order per sample: at each of the four stages every sample runs the op its permutation names there (the other
ops at that stage are identities), which is torchvision's ``ColorJitter`` with ``fn_idx = randperm(4)``; the hue
op is computed once per batch, between each sample's earlier and later blends.

The random draws (:func:`draw_photometric`) follow the laws of :class:`~contrastlab.views.photometric.
PhotometricRecipe` (coins with the stage probabilities, factors uniform in ColorJitter's ranges, a uniform
permutation, blur sigma uniform in ``blur_sigma``); they are the same distributions as the CPU path, not the
same numbers.

Example:
    >>> images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    >>> boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0]]).repeat(4, 1)
    >>> render_crops(images, boxes, 16).shape
    torch.Size([4, 3, 16, 16])
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from contrastlab.views.photometric import PhotometricRecipe, _jitter_ranges, blur_kernel_size

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
"""ITU-R 601-2 luma weights, as torchvision's ``rgb_to_grayscale``."""


def _cached_unless_compiling(maxsize: int) -> Callable[[Callable], Callable]:
    """``functools.lru_cache`` for the device constants below; inside a compiled render the function runs
    uncached instead, and its result becomes a constant of the graph."""
    def wrap(fn: Callable) -> Callable:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            return fn(*args) if torch.compiler.is_compiling() else cached(*args)
        return call
    return wrap


@_cached_unless_compiling(maxsize=256)
def _constant(values: tuple, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A small constant tensor on ``device``, copied there once (a fresh copy each step would wait for the device)."""
    return torch.tensor(values, dtype=dtype).to(device)


# --- crop + resize -------------------------------------------------------------------------------------------


def snap_boxes(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Snap float boxes ``[B, 4]`` to whole pixels as :func:`~contrastlab.views.boxes.box_to_pixels` does.

    Returns:
        ``(left, top, width, height)``, float tensors ``[B]`` of whole numbers; each edge is rounded half up and
        each side keeps at least one pixel.
    """
    edges = torch.floor(boxes + 0.5)
    left, top, right, bottom = edges.unbind(-1)
    return left, top, (right - left).clamp(min=1.0), (bottom - top).clamp(min=1.0)


def resample_weights(start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int,
                     pad: int = 0) -> torch.Tensor:
    """Antialiased bilinear weights of a crop along one axis, ``[B, out_size, in_size]``.

    Row ``i`` of sample ``b`` holds the weights PIL's (and torch's ``antialias=True``) bilinear resize gives the
    source pixels ``start[b] .. start[b] + length[b] - 1`` for output pixel ``i``; pixels of the crop that fall
    outside ``0 .. in_size - 1`` (up to ``pad`` on either side) are zeros: their weights count in the
    normalisation but have no column.

    Args:
        start: First source pixel of each crop, ``[B]`` (whole numbers, may be negative when padding).
        length: Crop length in pixels, ``[B]`` (whole numbers, at least 1).
        out_size: Output length ``S``.
        in_size: Source length.
        pad: Bound on how far a crop may leave the source on either side (``RandomCrop``'s padding).
    """
    device = start.device
    start, length = start.float(), length.float()
    scale = length / out_size
    support = scale.clamp(min=1.0)
    centre = (torch.arange(out_size, device=device, dtype=torch.float32) + 0.5) * scale[:, None]
    position = torch.arange(-pad, in_size + pad, device=device, dtype=torch.float32)
    tap = position[None, :] - start[:, None]  # each source position in crop coordinates, [B, in + 2 pad]
    weights = (1.0 - (tap[:, None, :] + 0.5 - centre[:, :, None]).abs() / support[:, None, None]).clamp(min=0.0)
    weights = weights * ((tap >= 0) & (tap < length[:, None]))[:, None, :]
    weights = weights / weights.sum(-1, keepdim=True)
    return weights[:, :, pad:pad + in_size] if pad else weights


def render_crops(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None,
                 pad: int = 0) -> torch.Tensor:
    """Crop ``boxes`` out of ``images`` and resize each to ``size`` x ``size`` (bilinear, antialiased), batched.

    Args:
        images: ``[B, C, H, W]``, uint8 (0..255) or float (0..1). Images of different sizes are zero-padded to a
            common canvas; their boxes must lie inside their own image.
        boxes: ``[B, 4]`` boxes ``(x0, y0, x1, y1)`` in source pixels, snapped like the CPU renderer.
        size: Output side length.
        flip: ``[B]`` bool, mirror those views horizontally (torchvision's ``hflip``).
        pad: Bound on how far boxes leave the image (``PaddedCropPlanner.padding``); outside is zero.

    Returns:
        Float32 views ``[B, C, size, size]`` on the 0..1 scale.
    """
    if images.dim() != 4 or boxes.shape != (images.shape[0], 4):
        raise ValueError(f"render_crops needs images [B, C, H, W] and boxes [B, 4], got {tuple(images.shape)} and "
                         f"{tuple(boxes.shape)}")
    left, top, width, height = snap_boxes(boxes.float())
    rows = resample_weights(top, height, size, images.shape[-2], pad)
    cols = resample_weights(left, width, size, images.shape[-1], pad)
    if flip is not None:
        cols = torch.where(flip[:, None, None], cols.flip(1), cols)
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    return rows[:, None] @ x @ cols.transpose(1, 2)[:, None]


# --- photometric ops -----------------------------------------------------------------------------------------


def _per_sample(value: torch.Tensor) -> torch.Tensor:
    return value.reshape(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma ``[B, 1, H, W]`` of RGB images ``[B, 3, H, W]`` (torchvision's ``rgb_to_grayscale``)."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hue (in turns, 0..1), saturation and value of RGB images ``[B, 3, H, W]`` on the 0..1 scale."""
    r, g, b = x.unbind(1)
    value = x.amax(1)
    chroma = value - x.amin(1)
    grey = chroma == 0
    safe_chroma = torch.where(grey, torch.ones_like(chroma), chroma)
    saturation = chroma / torch.where(grey, torch.ones_like(value), value)
    # Sector by sector: the channel holding the maximum decides the formula (red wins ties, then green).
    hue = torch.where(value == r, (g - b) / safe_chroma,
                      torch.where(value == g, 2.0 + (b - r) / safe_chroma, 4.0 + (r - g) / safe_chroma))
    hue = torch.where(grey, torch.zeros_like(hue), hue)
    return torch.remainder(hue / 6.0, 1.0), saturation, value


def hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """RGB images ``[B, 3, H, W]`` from hue (turns), saturation and value ``[B, H, W]``."""
    h6 = hue * 6.0
    sector = torch.floor(h6)
    frac = h6 - sector
    sector = torch.remainder(sector, 6.0)
    p = value * (1.0 - saturation)
    q = value * (1.0 - saturation * frac)
    t = value * (1.0 - saturation * (1.0 - frac))
    # (r, g, b) per sector 0..5: (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q)
    choices = torch.stack([value, t, p, q], 0)  # index 0 v, 1 t, 2 p, 3 q
    table = _constant(((0, 1, 2), (3, 0, 2), (2, 0, 1), (2, 3, 0), (1, 2, 0), (0, 2, 3)), hue.device, torch.long)
    pick = table[sector.long()]  # [B, H, W, 3]
    rgb = torch.gather(choices.permute(1, 2, 3, 0), -1, pick)  # [B, H, W, 3]
    return rgb.permute(0, 3, 1, 2)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each image by ``shift[b]`` turns (torchvision's ``adjust_hue``)."""
    hue, saturation, value = rgb_to_hsv(x)
    return hsv_to_rgb(torch.remainder(hue + shift.reshape(-1, 1, 1), 1.0), saturation, value)


@_cached_unless_compiling(maxsize=32)
def _reflect_taps(size: int, kernel: int, device: torch.device) -> torch.Tensor:
    """``P [kernel, size, size]``: ``P[t, i, j] = 1`` when tap ``t`` of output ``i`` reads pixel ``j`` (reflect pad)."""
    half = kernel // 2
    if half >= size:
        raise ValueError(f"a blur kernel of {kernel} pixels needs views larger than {half} pixels, got {size}")
    source = torch.arange(size)[:, None] + torch.arange(kernel)[None, :] - half  # [size, kernel]
    source = source.abs()  # reflect at the start (no repeat of the edge pixel), as torch's "reflect" padding
    source = torch.where(source > size - 1, 2 * (size - 1) - source, source)
    taps = torch.zeros(kernel, size, size)
    taps[torch.arange(kernel)[None, :].expand(size, kernel), torch.arange(size)[:, None].expand(size, kernel),
         source] = 1.0
    return taps.to(device)


def gaussian_kernels(sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels ``[B, kernel]`` of torchvision's ``gaussian_blur`` for sigmas ``[B]``."""
    half = (kernel - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel, device=sigma.device)
    pdf = torch.exp(-0.5 * (x[None, :] / sigma[:, None]).pow(2))
    return pdf / pdf.sum(-1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int, apply: torch.Tensor | None = None) -> torch.Tensor:
    """Blur square images ``[B, C, S, S]`` with a per-sample sigma (torchvision's kernel, reflect padding).

    Args:
        x: Images to blur.
        sigma: ``[B]`` standard deviations in pixels.
        kernel: Odd kernel size.
        apply: ``[B]`` bool; samples where it is False are returned unchanged.
    """
    size = x.shape[-1]
    if x.shape[-2] != size:
        raise ValueError(f"gaussian_blur renders square views, got {tuple(x.shape[-2:])}")
    taps = _reflect_taps(size, kernel, x.device)
    matrix = torch.einsum("bt,tij->bij", gaussian_kernels(sigma.float(), kernel), taps)
    if apply is not None:
        eye = torch.eye(size, device=x.device).expand_as(matrix)
        matrix = torch.where(apply[:, None, None], matrix, eye)
    m = matrix[:, None]
    return m @ x @ m.transpose(-1, -2)


def solarize(x: torch.Tensor, threshold: float, apply: torch.Tensor) -> torch.Tensor:
    """Invert the pixels ``>= threshold`` (0..1 scale) of the samples where ``apply`` holds."""
    return torch.where(_per_sample(apply) & (x >= threshold), 1.0 - x, x)


# --- random parameters and the recipe ------------------------------------------------------------------------

_IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation, hue


@dataclass
class PhotometricDraw:
    """One view's per-sample photometric parameters (tensors ``[B]``, ``order`` and ``factors`` ``[B, 4]``).

    Attributes:
        jitter: Colour jitter applied.
        order: Permutation of the jitter ops (0 brightness, 1 contrast, 2 saturation, 3 hue) per sample.
        factors: Brightness, contrast, saturation factors and hue shift (identities where jitter is off).
        gray: Converted to grayscale.
        blur: Blurred.
        sigma: Blur sigma.
        solarize: Solarised.
        flip: Flipped horizontally.
    """

    jitter: torch.Tensor
    order: torch.Tensor
    factors: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor
    flip: torch.Tensor


def draw_photometric(recipe: PhotometricRecipe, batch: int, generator: torch.Generator) -> PhotometricDraw:
    """Draw ``batch`` samples of ``recipe``'s random parameters on ``generator``'s device.

    The laws are the CPU recipe's: each stage fires with its probability, the jitter factors are uniform in
    ColorJitter's ranges (strength 0: the identity), the op order a uniform permutation, sigma uniform.
    """
    device = generator.device
    u = torch.rand(batch, 5, generator=generator, device=device)
    coins = u < _constant((recipe.jitter_prob, recipe.grayscale_prob, recipe.blur_prob, recipe.solarize_prob,
                           recipe.flip_prob), device)
    order = torch.rand(batch, 4, generator=generator, device=device).argsort(dim=1)
    ranges = _jitter_ranges(recipe.jitter)  # type: ignore[arg-type]
    low = _constant(tuple(r[0] if r else i for r, i in zip(ranges, _IDENTITY_FACTORS)), device)
    high = _constant(tuple(r[1] if r else i for r, i in zip(ranges, _IDENTITY_FACTORS)), device)
    factors = low + (high - low) * torch.rand(batch, 4, generator=generator, device=device)
    jitter = coins[:, 0] & bool(any(recipe.jitter))
    factors = torch.where(jitter[:, None], factors, _constant(_IDENTITY_FACTORS, device))
    lo, hi = recipe.blur_sigma
    sigma = lo + (hi - lo) * torch.rand(batch, generator=generator, device=device)
    return PhotometricDraw(jitter=jitter, order=order, factors=factors, gray=coins[:, 1], blur=coins[:, 2],
                           sigma=sigma, solarize=coins[:, 3], flip=coins[:, 4])


def _blend_weights(order: torch.Tensor, factors: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Per-sample weights ``[3, B, 4]`` of the blend at each jitter stage: ``(f, (1 - f) [contrast], (1 - f)
    [saturation])``, so that stage ``k`` maps ``x`` to ``clamp(f x + w_mean mean(gray(x)) + w_gray gray(x), 0, 1)``.

    Sample ``b`` runs op ``order[b, k]`` (0 brightness: partner black, 1 contrast: partner the grayscale mean,
    2 saturation: partner the grayscale image) where ``active[b, k]``; elsewhere (and for op 3, hue) the stage
    is the identity ``f = 1``, zero weights. Each weight is zero or ``(1 - f)``, so the sum is bit for bit
    torchvision's ``f x + (1 - f) partner``.
    """
    run = active & (order < 3)
    f = torch.where(run, factors.gather(1, order.clamp(max=2)), torch.ones_like(factors))
    rest = 1.0 - f
    zero = torch.zeros_like(f)
    return torch.stack([f, torch.where(order == 1, rest, zero), torch.where(order == 2, rest, zero)])


def _blend_stage(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One jitter stage of the three blend ops with per-sample ``weights [3, B]`` (:func:`_blend_weights`)."""
    f, w_mean, w_gray = (_per_sample(w) for w in weights)
    gray = grayscale(x)
    return (f * x + w_mean * gray.mean(dim=(1, 2, 3), keepdim=True) + w_gray * gray).clamp(0.0, 1.0)


def color_jitter(x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor, with_hue: bool = True) -> torch.Tensor:
    """torchvision's ``ColorJitter`` with per-sample op order and factors (identity factors: no change).

    Brightness, contrast and saturation are one blend per stage whose partner (black, the grayscale mean, the
    grayscale image) and factor are chosen per sample; the weights of all stages are computed at once
    (:func:`_blend_weights`). The hue op, the costly one, runs once for the whole batch: first every sample's
    blends *before* its hue stage, then the hue shift, then its blends *after* it, which is the same sequence of
    ops per sample as running the four stages in order. ``with_hue=False`` (no hue jitter in the recipe) runs the
    four blend stages only.
    """
    if not with_hue:
        weights = _blend_weights(order, factors, torch.ones_like(order, dtype=torch.bool))
        for stage in range(4):
            x = _blend_stage(x, weights[:, :, stage])
        return x
    hue_stage = (order == 3).int().argmax(dim=1, keepdim=True)
    stages = torch.arange(4, device=order.device)
    before = _blend_weights(order, factors, stages < hue_stage)
    after = _blend_weights(order, factors, stages > hue_stage)
    for stage in range(3):  # blends before the hue stage (which is at most stage 3)
        x = _blend_stage(x, before[:, :, stage])
    shift = factors[:, 3]
    x = torch.where(_per_sample(shift != 0), adjust_hue(x, shift), x)
    for stage in range(1, 4):  # blends after it
        x = _blend_stage(x, after[:, :, stage])
    return x


def to_grayscale(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Three-channel grayscale where ``apply`` holds (torchvision's ``RandomGrayscale``)."""
    return torch.where(_per_sample(apply), grayscale(x).expand_as(x), x)


def apply_photometric(x: torch.Tensor, recipe: PhotometricRecipe, draw: PhotometricDraw) -> torch.Tensor:
    """Run ``recipe`` on rendered views ``x [B, 3, S, S]`` (0..1) with the parameters ``draw``; returns normalised views.

    The flip is not applied here: it is part of the render (:func:`render_crops`'s ``flip``), which commutes with
    every op below. Stages whose probability is 0 cost nothing.
    """
    if recipe.grayscale_first and recipe.grayscale_prob > 0:
        x = to_grayscale(x, draw.gray)
    if recipe.jitter_prob > 0 and any(recipe.jitter):
        x = color_jitter(x, draw.order, draw.factors, with_hue=recipe.jitter[3] > 0)
    if not recipe.grayscale_first and recipe.grayscale_prob > 0:
        x = to_grayscale(x, draw.gray)
    if recipe.blur_prob > 0:
        kernel = blur_kernel_size(x.shape[-1], recipe.blur_kernel_fraction)
        x = gaussian_blur(x, draw.sigma, kernel, draw.blur)
    if recipe.solarize_prob > 0:
        x = solarize(x, recipe.solarize_threshold / 255.0, draw.solarize)
    mean = _constant(tuple(recipe.mean), x.device).reshape(1, 3, 1, 1)
    std = _constant(tuple(recipe.std), x.device).reshape(1, 3, 1, 1)
    return (x - mean) / std


def render_view(images: torch.Tensor, boxes: torch.Tensor, size: int, recipe: PhotometricRecipe,
                draw: PhotometricDraw, pad: int = 0) -> torch.Tensor:
    """One view of a batch: crop ``boxes [B, 4]``, resize to ``size``, flip, then ``recipe`` with the parameters
    ``draw``; normalised float ``[B, 3, size, size]``. A pure function of its tensors (no random draw), so it
    can be compiled (:func:`compiled_render_view`)."""
    x = render_crops(images, boxes, size, draw.flip if recipe.flip_prob > 0 else None, pad)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return apply_photometric(x, recipe, draw)


_compiled: dict[str, Callable] = {}


def compiled_render_view() -> Callable:
    """:func:`render_view` through ``torch.compile`` (inductor, static shapes): its ~150 element-wise ops per view
    fused into a few kernels. One compilation per view size, recipe and batch shape, on the first batch."""
    if "render_view" not in _compiled:
        _compiled["render_view"] = torch.compile(render_view)
    return _compiled["render_view"]


def render_views(images: torch.Tensor, boxes: torch.Tensor, sizes: Sequence[int],
                 recipes: Sequence[PhotometricRecipe], generator: torch.Generator,
                 blur_sigmas: torch.Tensor | None = None, use_joint_blur: torch.Tensor | None = None,
                 pad: int = 0, render: Callable = render_view) -> list[torch.Tensor]:
    """Every view of a batch: crop, resize, flip and the view's photometric recipe, all batched.

    Args:
        images: ``[B, C, H, W]`` uint8 (C = 1 is repeated to RGB after the resize) or float on 0..1.
        boxes: ``[B, V, 4]`` planned boxes (a planner's ``plan_batch``).
        sizes: Side of each view.
        recipes: Photometric recipe of each view.
        generator: Draws every photometric parameter (on the images' device).
        blur_sigmas: ``[B, 2]`` JointBlur sigmas of the first two views, used where ``use_joint_blur`` holds.
        use_joint_blur: ``[B]`` bool.
        pad: How far boxes may leave the image (padded crops).
        render: :func:`render_view` or its compiled form (:func:`compiled_render_view`).

    Returns:
        ``V`` normalised float views ``[B, 3, S_v, S_v]``.
    """
    views = []
    for v, (size, recipe) in enumerate(zip(sizes, recipes)):
        draw = draw_photometric(recipe, images.shape[0], generator)
        if blur_sigmas is not None and use_joint_blur is not None and v < 2:
            draw.sigma = torch.where(use_joint_blur, blur_sigmas[:, v].to(draw.sigma.dtype), draw.sigma)
        views.append(render(images, boxes[:, v], size, recipe, draw, pad))
    return views
