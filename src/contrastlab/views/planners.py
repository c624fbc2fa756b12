"""View planners: per image, decide where each view's crop lies (a list of boxes), nothing more.

Crops are boxes (see ``docs/architecture.md``): a planner never touches pixels, so the same planner serves
the CPU renderer in DataLoader workers and a batched GPU renderer, and tests can check its distribution
directly. Planners are plain, picklable objects. ``plan`` receives the sample's dataset ``index`` so that a
planner may read per-image state (ContrastiveCrop's box store); the planners here ignore it.

Randomness: ``generator=None`` draws from torch's global RNG (which ``DataLoader`` seeds per worker);
pass a ``torch.Generator`` to draw from an explicit stream instead.

Example:
    >>> planner = RandomResizedCropPlanner(num_views=2)
    >>> boxes = planner.plan(index=0, width=64, height=48, generator=torch.Generator().manual_seed(0))
    >>> len(boxes)
    2
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from contrastlab.errors import ConfigError
from contrastlab.views.boxes import Box, box_from_pixels, clip_box, validate_box, whole_image_box


@runtime_checkable
class Planner(Protocol):
    """Decides the crop box of every view of one image.

    Attributes:
        num_views: How many boxes ``plan`` returns.
    """

    num_views: int

    def plan(
        self, index: int, width: int, height: int, generator: torch.Generator | None = None
    ) -> list[Box]:
        """Return ``num_views`` boxes for sample ``index`` of size ``width`` x ``height``."""
        ...


def _check_num_views(num_views: int, name: str = "num_views") -> None:
    if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
        raise ConfigError(f"{name} must be a positive integer, got {num_views!r}")


def _check_image_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")


def _as_range(value: Sequence[float], name: str, low: float, high: float) -> tuple[float, float]:
    """Validate a ``(min, max)`` pair with ``low < min <= max <= high``."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a pair (min, max), got {value!r}") from exc
    if not (low < lo <= hi <= high):
        raise ConfigError(f"{name} must satisfy {low} < min <= max <= {high}, got {value!r}")
    return lo, hi


def sample_resized_crop(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> Box:
    """Draw one random resized crop box (SimCLR, Chen et al. 2020; Inception-style cropping).

    Follows torchvision's ``RandomResizedCrop.get_params`` step for step and makes the same torch RNG
    calls in the same order: up to 10 attempts, each drawing an area fraction uniformly from ``scale`` and
    an aspect ratio log-uniformly from ``ratio``, then the box position; if no attempt fits, a central crop
    with the aspect ratio clamped to ``ratio``. With the same RNG state the result equals torchvision's.

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
        scale: Range of the crop's area as a fraction of the image area.
        ratio: Range of the crop's aspect ratio (width / height).
        generator: RNG to draw from; ``None`` uses torch's global RNG.

    Returns:
        An integer-valued box inside the image.
    """
    area = height * width
    # Same float32 log as torchvision, so the sampled ratios agree bit for bit.
    log_ratio = torch.log(torch.tensor(ratio))
    log_lo, log_hi = float(log_ratio[0]), float(log_ratio[1])
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=generator)).item()
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return box_from_pixels(top, left, h, w)
    return central_crop_box(width, height, ratio)


def central_crop_box(width: int, height: int, ratio: tuple[float, float]) -> Box:
    """RandomResizedCrop's fallback: the whole image cut to the nearest aspect ratio in ``ratio``, centred."""
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    return box_from_pixels((height - h) // 2, (width - w) // 2, h, w)


@dataclass(frozen=True)
class RandomResizedCropPlanner:
    """Independent random resized crops per view (SimCLR, Chen et al. 2020; MoCo v2, BYOL).

    Each view's box is drawn with :func:`sample_resized_crop`, so under the same seed the boxes equal
    torchvision's ``RandomResizedCrop.get_params`` called once per view.

    Args:
        num_views: Number of views (2 for SimCLR/MoCo/BYOL).
        scale: Range of crop area as a fraction of the image area.
        ratio: Range of crop aspect ratio (width / height).

    Example:
        >>> planner = RandomResizedCropPlanner(scale=(0.2, 1.0))
        >>> [len(box) for box in planner.plan(0, 32, 32)]
        [4, 4]
    """

    num_views: int = 2
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

    def __post_init__(self) -> None:
        _check_num_views(self.num_views)
        object.__setattr__(self, "scale", _as_range(self.scale, "scale", 0.0, 1.0))
        object.__setattr__(self, "ratio", _as_range(self.ratio, "ratio", 0.0, math.inf))

    def plan(
        self, index: int, width: int, height: int, generator: torch.Generator | None = None
    ) -> list[Box]:
        """Return ``num_views`` independently drawn boxes."""
        _check_image_size(width, height)
        return [
            sample_resized_crop(width, height, self.scale, self.ratio, generator)
            for _ in range(self.num_views)
        ]


@dataclass(frozen=True)
class MultiCropPlanner:
    """SwAV multi-crop (Caron et al. 2020): ``num_large`` global crops, then ``num_small`` local crops.

    Every box is an independent random resized crop; large views come first in the returned list. The
    output sizes (e.g. 224 and 96) are the renderer's business, given per view to ``ViewDataset``.

    Args:
        num_large: Number of large (global) views.
        num_small: Number of small (local) views; may be 0.
        large_scale: Area-fraction range of the large views.
        small_scale: Area-fraction range of the small views.
        ratio: Aspect-ratio range shared by all views.
    """

    num_large: int = 2
    num_small: int = 6
    large_scale: tuple[float, float] = (0.14, 1.0)
    small_scale: tuple[float, float] = (0.05, 0.14)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

    def __post_init__(self) -> None:
        _check_num_views(self.num_large, "num_large")
        if isinstance(self.num_small, bool) or not isinstance(self.num_small, int) or self.num_small < 0:
            raise ConfigError(f"num_small must be a non-negative integer, got {self.num_small!r}")
        object.__setattr__(self, "large_scale", _as_range(self.large_scale, "large_scale", 0.0, 1.0))
        object.__setattr__(self, "small_scale", _as_range(self.small_scale, "small_scale", 0.0, 1.0))
        object.__setattr__(self, "ratio", _as_range(self.ratio, "ratio", 0.0, math.inf))

    @property
    def num_views(self) -> int:
        """Total number of views, large plus small."""
        return self.num_large + self.num_small

    def plan(
        self, index: int, width: int, height: int, generator: torch.Generator | None = None
    ) -> list[Box]:
        """Return the large boxes followed by the small boxes."""
        _check_image_size(width, height)
        large = [
            sample_resized_crop(width, height, self.large_scale, self.ratio, generator)
            for _ in range(self.num_large)
        ]
        small = [
            sample_resized_crop(width, height, self.small_scale, self.ratio, generator)
            for _ in range(self.num_small)
        ]
        return large + small


@dataclass(frozen=True)
class FixedBoxPlanner:
    """The same box for every view, or the whole image when ``box`` is None (evaluation).

    A given box is clipped to each image; an image it does not overlap raises ``ValueError``.

    Args:
        box: ``(x0, y0, x1, y1)`` in source pixels, or None for the whole image.
        num_views: Number of (identical) boxes returned.
    """

    box: Box | None = None
    num_views: int = 1

    def __post_init__(self) -> None:
        _check_num_views(self.num_views)
        if self.box is not None:
            try:
                object.__setattr__(self, "box", validate_box(self.box))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"FixedBoxPlanner box is invalid: {exc}") from exc

    def plan(
        self, index: int, width: int, height: int, generator: torch.Generator | None = None
    ) -> list[Box]:
        """Return ``num_views`` copies of the (clipped) box; draws no random numbers."""
        _check_image_size(width, height)
        if self.box is None:
            box = whole_image_box(width, height)
        else:
            box = clip_box(self.box, width, height)
            if not (box[0] < box[2] and box[1] < box[3]):
                raise ValueError(f"fixed box {self.box!r} lies outside the {width}x{height} image")
        return [box] * self.num_views


@dataclass(frozen=True)
class CenterCropPlanner:
    """A centred square crop of side ``crop_fraction * min(width, height)``, for evaluation.

    Rendered at size ``S`` this is the usual evaluation transform ``Resize(S / crop_fraction)`` then
    ``CenterCrop(S)`` (resize 256 / crop 224 for ``crop_fraction=0.875``), expressed as one box so the image
    is resampled once. The box is snapped to whole pixels and centred like torchvision's ``center_crop``.

    Args:
        crop_fraction: Side of the square relative to the shorter image side, in (0, 1].
        num_views: Number of (identical) boxes returned.
    """

    crop_fraction: float = 0.875
    num_views: int = 1

    def __post_init__(self) -> None:
        _check_num_views(self.num_views)
        if not (0.0 < float(self.crop_fraction) <= 1.0):
            raise ConfigError(f"crop_fraction must be in (0, 1], got {self.crop_fraction!r}")
        object.__setattr__(self, "crop_fraction", float(self.crop_fraction))

    def plan(
        self, index: int, width: int, height: int, generator: torch.Generator | None = None
    ) -> list[Box]:
        """Return ``num_views`` copies of the centred square box; draws no random numbers."""
        _check_image_size(width, height)
        side = max(1, round(self.crop_fraction * min(width, height)))
        top = round((height - side) / 2.0)
        left = round((width - side) / 2.0)
        return [box_from_pixels(top, left, side, side)] * self.num_views


@dataclass(frozen=True)
class PaddedCropPlanner:
    """``RandomCrop(size, padding=p)`` of the classic CIFAR augmentation: a same-size box shifted by up to ``p``.

    He et al. 2016 (section 4.2): pad 4 pixels with zeros on each side, then take a random crop of the
    original size. As a box this is the image's own box translated by ``(j - p, i - p)``, with ``i`` then
    ``j`` drawn uniformly from ``0 .. 2p`` in torchvision's order (``RandomCrop.get_params`` on the padded
    image), so the same RNG state gives torchvision's crop. The box may leave the image; the renderer
    fills the outside with zeros, as the padding does. Supervised MCL on CIFAR-100 uses ``p = 4``.

    Args:
        padding: Pixels of zero padding on each side.
        num_views: Number of independently shifted boxes.
    """

    padding: int = 4
    num_views: int = 1
    pads: ClassVar[bool] = True  #: boxes may leave the image (ViewDataset then accepts them)

    def __post_init__(self) -> None:
        _check_num_views(self.num_views)
        if isinstance(self.padding, bool) or not isinstance(self.padding, int) or self.padding < 0:
            raise ConfigError(f"padding must be a non-negative integer, got {self.padding!r}")

    def plan(
        self, index: int, width: int, height: int, generator: torch.Generator | None = None
    ) -> list[Box]:
        """Return ``num_views`` boxes of the image's size, each shifted by up to ``padding`` pixels."""
        _check_image_size(width, height)
        p = self.padding
        boxes = []
        for _ in range(self.num_views):
            top = int(torch.randint(0, 2 * p + 1, size=(1,), generator=generator).item()) - p
            left = int(torch.randint(0, 2 * p + 1, size=(1,), generator=generator).item()) - p
            boxes.append(box_from_pixels(top, left, height, width))
        return boxes


PLANNERS: dict[str, Callable[..., Planner]] = {
    "random_resized": RandomResizedCropPlanner,
    "fixed": FixedBoxPlanner,
    "center": CenterCropPlanner,
    "multicrop": MultiCropPlanner,
    "padded_crop": PaddedCropPlanner,
}
"""Planner registry: config name -> constructor. ``"joint_crop"`` (``JointCropPlanner``) is added by
``contrastlab.views.__init__``, since ``views/joint_crop.py`` imports this module."""


def _suggest(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=3)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def make_planner(name: str, **kwargs: Any) -> Planner:
    """Build a planner from its registry name and keyword arguments.

    Args:
        name: One of ``PLANNERS`` (``"random_resized"``, ``"fixed"``, ``"center"``, ``"multicrop"``,
            ``"padded_crop"``, ``"joint_crop"``).
        **kwargs: Constructor arguments of that planner.

    Raises:
        ConfigError: If the name or a keyword is unknown, or a value is invalid.

    Example:
        >>> make_planner("multicrop", num_small=4).num_views
        6
    """
    if name not in PLANNERS:
        valid = sorted(PLANNERS)
        raise ConfigError(f"unknown planner {name!r}{_suggest(name, valid)}; valid planners: {valid}")
    factory = PLANNERS[name]
    accepted = list(inspect.signature(factory).parameters)
    for key in kwargs:
        if key not in accepted:
            raise ConfigError(
                f"planner {name!r} has no option {key!r}{_suggest(key, accepted)}; valid options: {accepted}"
            )
    return factory(**kwargs)
