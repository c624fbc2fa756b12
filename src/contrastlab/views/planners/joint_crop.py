"""JointCrop(beta): the two crops of a positive pair are drawn jointly, through their log area ratio.

Zhang, Xie, Chen, Sun, Kang, Wang, "Enhancing Contrastive Learning Inspired by the Philosophy of 'The Blind
Men and the Elephant'", AAAI 2025 (arXiv 2412.16522; the appendix, Algorithm 1, defines the family).
Two independent random resized crops have area fractions ``s1, s2`` i.i.d. uniform on ``[smin, smax]``,
so their ratio is most often close to 1 (an easy pair). JointCrop draws the log area ratio
``r = log(s2 / s1)`` first, from a distribution whose shape ``beta`` sets, then the first area inside the
bounds that keep both areas in ``[smin, smax]``, and the second from the ratio. Aspect ratio and position
are then drawn per view as in RandomResizedCrop. JointCrop(0), the published default, makes ``r`` uniform.

The family, as implemented (``L`` is the bound on ``|r|``, ``Phi``/``phi`` the standard normal CDF/density):

    L = log(smax / smin - epsilon)

    beta > 0   truncated normal, centred on ratio 1:       p(r) = phi(r / sigma) / (sigma Z),
    beta = 0   uniform:                                    p(r) = 1 / (2 L),
    beta < 0   the same normal reflected to the edges:     p(r) = phi((L - |r|) / sigma) / (sigma Z),

    for -L <= r <= L, with sigma = L / |beta| and Z = 2 Phi(|beta|) - 1, so the truncation points are
    |beta| standard deviations away from the mode. For beta < 0 a draw ``x`` of the beta > 0 law with the
    same |beta| is reflected half by half: ``r = -L - x`` if ``x < 0`` else ``r = L - x`` (Algorithm 1,
    lines 7-11), which moves mass from ratio 1 to the extreme ratios ``exp(+-L)``. As beta -> 0 from
    either side, sigma -> infinity and both laws tend to the uniform one, so the family is continuous.

    s1 | r  ~  U[max(smin, smin e^-r), min(smax, smax e^-r)],      s2 = s1 e^r,

that is, given ``r``, ``s1`` is uniform over the areas for which both ``s1`` and ``s2`` lie in
``[smin, smax]``. ``s1`` and ``s2`` are fractions of the image area.

Each view then follows RandomResizedCrop with its area held fixed: up to 10 attempts, each drawing an aspect
ratio log-uniformly from ``ratio`` and keeping the first ``(w, h) = (round(sqrt(A a)), round(sqrt(A / a)))``
that fits, then a uniform position. A view for which no attempt fits takes the fallback box.

Reading of the paper and of the released code (``github.com/btzyd/JointCrop``, ``moco/loader.py``,
class ``JointCrop.get_params``, used by ``TwoCropsTransform_JointCrop`` from ``main_jointcrop.py`` with
``scale=(crop_min, 1)``); where they differ the released code is the default:

- **epsilon.** Algorithm 1 bounds ``|r|`` by ``s_b = log(smax / smin)``. The code uses
  ``log(smax / smin - 0.1)``: epsilon is subtracted from the *ratio* inside the log, not from the log
  (the last commit, "fix the small value of log_scale", raised it from 0.01 to 0.1). Without it the first
  area's interval collapses to one point at ``|r| = s_b``. ``epsilon=0`` gives the paper's bound. For
  scale (0.2, 1) the largest area ratio is 4.9 instead of 5.
- **beta.** The code ships only JointCrop(0) (uniform ``r``). The beta != 0 laws are reconstructed from
  Algorithm 1, which writes ``log s_r ~ N_T(0, s_b / beta; -s_b, s_b)`` for beta > 0 and
  ``N_T(0, -s_b / beta; -s_b, s_b)`` then the reflection for beta < 0. We read the second argument as the
  standard deviation (it has the units of ``r``; ``beta`` is then the truncation point in standard
  deviations). Reading it as a variance instead would give ``sigma = sqrt(L / |beta|)``. The bound ``L``
  (with epsilon) is the same for every beta.
- **Attempts.** The paper only says the boxes follow "the same steps as RandomCrop". The code draws each
  area once and retries only the aspect ratio (10 attempts per view, view 1 then view 2), where
  torchvision's RandomResizedCrop redraws the area too.
- **Fallback.** When no attempt fits, the code uses the *whole image* for that view only (the other view
  keeps its box), not torchvision's central crop with the aspect ratio clamped to ``ratio``.
  ``fallback="whole_image"`` (default) follows the code, ``fallback="central_crop"`` uses
  RandomResizedCrop's central crop. Both can leave ``[smin, smax]`` (the whole image has area 1).

With ``beta=0``, ``epsilon=0.1`` and ``fallback="whole_image"`` the boxes equal the released
``JointCrop.get_params`` under the same torch RNG state: the same draws in the same order (log ratio, first
area, then the attempts of view 1 and of view 2), in the same float32 arithmetic.

Multi-crop (``num_small > 0``): the first two boxes are the joint global pair, then ``num_small`` independent
random resized crops from ``small_scale``. (The appendix also tried joint sampling of DINO's local pairs;
that variant is not implemented here.)

Example:
    >>> planner = JointCropPlanner(beta=0.0, scale=(0.2, 1.0))
    >>> boxes = planner.plan(0, 224, 224, torch.Generator().manual_seed(0))
    >>> len(boxes)
    2
    >>> pair = sample_area_pair(0.0, (0.2, 1.0), generator=torch.Generator().manual_seed(0))
    >>> abs(pair.log_ratio) <= log_area_ratio_bound((0.2, 1.0), 0.1)
    True
"""

from __future__ import annotations

import functools
import math
import statistics
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch

from contrastlab.errors import ConfigError
from contrastlab.registry import register_planner
from contrastlab.views.boxes import Box, box_area, box_from_pixels, whole_image_box
from contrastlab.views.planners import batch_sampling as bs
from contrastlab.views.planners.base import (
    Planner,
    PlannerContext,
    as_range,
    check_image_size,
    small_view_size,
)
from contrastlab.views.planners.multicrop import MultiCropPlanner
from contrastlab.views.planners.random_resized import (
    RandomResizedCropPlanner,
    central_crop_box,
    sample_resized_crop,
)

_STANDARD_NORMAL = statistics.NormalDist()

FALLBACKS = ("whole_image", "central_crop")
"""What a view becomes when none of its 10 attempts fits: the released code's whole image, or torchvision's
RandomResizedCrop central crop (aspect ratio clamped to ``ratio``)."""


class AreaPair(NamedTuple):
    """One joint draw of JointCrop: the log area ratio and the two area fractions.

    Attributes:
        log_ratio: ``r = log(second / first)``, in ``[-L, L]``.
        first: Area fraction of the first view, in ``[smin, smax]``.
        second: Area fraction of the second view, ``first * exp(log_ratio)``.
    """

    log_ratio: float
    first: float
    second: float


class AreaRatioStatistics(NamedTuple):
    """How far apart the areas of a planner's first two boxes are.

    Attributes:
        median: Median over pairs of ``max(a1 / a2, a2 / a1)`` (box areas in pixels, so with rounding).
        share_above_2: Fraction of pairs whose ratio exceeds 2.
        n: Number of pairs drawn.
    """

    median: float
    share_above_2: float
    n: int


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
        raise ConfigError(f"beta must be a finite number, got {beta!r}")
    return float(beta)


def _check_epsilon(epsilon: float, scale: tuple[float, float]) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon):
        raise ConfigError(f"epsilon must be a finite number, got {epsilon!r}")
    epsilon = float(epsilon)
    if epsilon < 0:
        raise ConfigError(f"epsilon must be >= 0 (0 is the paper's bound), got {epsilon!r}")
    if scale[1] / scale[0] - epsilon < 1.0:
        raise ConfigError(
            f"JointCrop needs scale[1] / scale[0] - epsilon >= 1 so that the log area ratio bound "
            f"log(scale[1] / scale[0] - epsilon) is not negative; got scale={scale!r}, epsilon={epsilon!r} "
            f"(widen scale or lower epsilon)"
        )
    return epsilon


def log_area_ratio_bound(scale: Sequence[float], epsilon: float = 0.1) -> float:
    """The bound ``L = log(smax / smin - epsilon)`` on ``|log(s2 / s1)|``, in float32 like the released code.

    Args:
        scale: ``(smin, smax)``, area fractions with ``0 < smin <= smax <= 1``.
        epsilon: Subtracted from the ratio ``smax / smin`` (0.1 in the released code, 0 in the paper).

    Raises:
        ConfigError: If ``scale`` or ``epsilon`` is invalid or ``smax / smin - epsilon < 1``.

    Example:
        >>> round(log_area_ratio_bound((0.2, 1.0), 0.1), 4)  # log(4.9)
        1.5892
    """
    lo, hi = as_range(scale, "scale", 0.0, 1.0)
    return _float32_log_bound(lo, hi, _check_epsilon(epsilon, (lo, hi)))


@functools.lru_cache(maxsize=64)
def _float32_log_bound(lo: float, hi: float, epsilon: float) -> float:
    return float(torch.log(torch.tensor(hi / lo - epsilon)))


def _draw_log_ratio(beta: float, bound: float, generator: torch.Generator | None) -> torch.Tensor:
    """One ``r`` in ``[-bound, bound]`` as a float32 tensor of shape ``[1]`` (one random number drawn)."""
    if beta == 0.0 or bound == 0.0:
        # The released code's draw, bit for bit: a float32 uniform on [-L, L].
        return torch.empty(1).uniform_(-bound, bound, generator=generator)
    # Truncated normal N(0, sigma^2) on [-L, L] by inverting its CDF, in float64: with u ~ U[0, 1),
    # p = 1/2 + (u - 1/2)(2 Phi(|beta|) - 1) and x = sigma Phi^-1(p). The guards cover the ends, where p
    # rounds to 0 or 1 for large |beta|.
    u = torch.rand(1, dtype=torch.float64, generator=generator).item()
    p = 0.5 + (u - 0.5) * math.erf(abs(beta) / math.sqrt(2.0))
    sigma = bound / abs(beta)
    x = -bound if p <= 0.0 else bound if p >= 1.0 else sigma * _STANDARD_NORMAL.inv_cdf(p)
    x = min(max(x, -bound), bound)
    if beta < 0:
        # Reflect each half towards its edge: near 0 goes to near -L (negative half) or +L (positive half).
        x = -bound - x if x < 0 else bound - x
    return torch.tensor([x], dtype=torch.float32)


def _draw_pair(
    beta: float, bound: float, scale: tuple[float, float], generator: torch.Generator | None
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Draw ``(r, exp(r), s1)``: the log ratio and the first area fraction as float32 tensors."""
    log_ratio = _draw_log_ratio(beta, bound, generator)
    ratio = torch.exp(log_ratio).item()
    lo = max(scale[0], scale[0] / ratio)
    hi = max(lo, min(scale[1] / ratio, scale[1]))  # max(): float rounding at |r| = L when epsilon = 0
    first = torch.empty(1).uniform_(lo, hi, generator=generator)
    return log_ratio, ratio, first


def sample_area_pair(
    beta: float = 0.0,
    scale: Sequence[float] = (0.2, 1.0),
    epsilon: float = 0.1,
    generator: torch.Generator | None = None,
) -> AreaPair:
    """Draw one JointCrop(beta) log area ratio and the two area fractions (no boxes).

    The same draws, in the same order, as the first step of :meth:`JointCropPlanner.plan`; see the module
    docstring for the densities.

    Args:
        beta: Shape of the log-ratio law: > 0 concentrates on ratio 1, 0 is uniform, < 0 favours the edges.
        scale: ``(smin, smax)``, range of each view's area as a fraction of the image area.
        epsilon: The bound on ``|r|`` is ``log(smax / smin - epsilon)``.
        generator: RNG to draw from; ``None`` uses torch's global RNG.

    Returns:
        ``AreaPair(log_ratio, first, second)``.

    Raises:
        ConfigError: If an option is invalid.

    Example:
        >>> pair = sample_area_pair(-2.0, (0.2, 1.0), generator=torch.Generator().manual_seed(1))
        >>> 0.2 <= pair.first <= 1.0 and 0.2 <= pair.second <= 1.0 + 1e-6
        True
    """
    beta = _check_beta(beta)
    scale = as_range(scale, "scale", 0.0, 1.0)
    bound = log_area_ratio_bound(scale, epsilon)
    log_ratio, ratio, first = _draw_pair(beta, bound, scale, generator)
    first_fraction = first.item()
    return AreaPair(log_ratio.item(), first_fraction, first_fraction * ratio)


def _float32(value: float) -> float:
    """``value`` rounded to the nearest float32."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _place(
    width: int,
    height: int,
    target_area: float,
    log_lo: float,
    log_hi: float,
    generator: torch.Generator | None,
) -> Box | None:
    """Up to 10 aspect-ratio attempts for a crop of fixed area in pixels; None if none fits.

    ``target_area`` and each aspect ratio are float32 values, and the released code multiplies and divides
    them as float32 tensors. The float64 product or quotient rounded to float32 is that same float32 result
    (double rounding is exact for these operations since 53 >= 2 * 24 + 2), without a tensor op per attempt.
    """
    for _ in range(10):
        aspect = torch.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=generator)).item()
        w = round(math.sqrt(_float32(target_area * aspect)))
        h = round(math.sqrt(_float32(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return box_from_pixels(top, left, h, w)
    return None


@register_planner("joint_crop")
@dataclass(frozen=True)
class JointCropPlanner(Planner):
    """JointCrop(beta) (Zhang et al., AAAI 2025): a positive pair whose areas are drawn jointly.

    The log area ratio ``r = log(s2 / s1)`` follows the beta family on ``[-L, L]``,
    ``L = log(smax / smin - epsilon)`` (truncated normal for beta > 0, uniform for beta = 0, normal reflected
    to the edges for beta < 0; densities in the module docstring), then ``s1`` is uniform among the areas
    that keep ``s1`` and ``s2 = s1 e^r`` in ``scale``. Each view gets an aspect ratio and a position as in
    RandomResizedCrop (10 attempts with its area fixed), or the ``fallback`` box. With ``num_small > 0`` the
    joint global pair is followed by ``num_small`` independent random resized crops (multi-crop).

    Args:
        beta: Shape of the log-ratio law; 0 is the published JointCrop(0). Larger beta gives easier pairs
            (areas alike), negative beta harder ones (one large and one small view).
        scale: Area range ``(smin, smax)`` of the global pair, as fractions of the image area (MoCo v3's
            ResNet ``crop_min`` 0.2).
        ratio: Aspect-ratio range (width / height), shared by all views.
        epsilon: Subtracted from ``smax / smin`` inside the bound's log (0.1 as the released code; 0 as the
            paper's Algorithm 1).
        fallback: Box of a view for which no attempt fits: ``"whole_image"`` (released code) or
            ``"central_crop"`` (torchvision RandomResizedCrop's clamped central crop).
        num_small: Number of small (local) views after the global pair; may be 0.
        small_scale: Area range of the small views.
        small_size: Side of the small views when rendered (0: half the large side, at least 8).

    Example:
        >>> planner = JointCropPlanner(beta=-2.0, num_small=4)
        >>> planner.num_views
        6
        >>> len(planner.plan(0, 500, 375, torch.Generator().manual_seed(0)))
        6
    """

    @dataclass
    class Settings:
        num_views: int = 2  #: the joint pair (always 2; small views come from num_small)
        joint_beta: float = 0.0  #: shape of the log-area-ratio law (0 = uniform, JointCrop(0))
        joint_epsilon: float = 0.1  #: bound log(smax / smin - epsilon) on |log area ratio|
        joint_fallback: Literal["whole_image", "central_crop"] = "whole_image"  #: whole_image (released code) | central_crop
        scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  #: area fraction range of the pair
        ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  #: aspect ratio range
        num_small: int = 0  #: multi-crop: number of small views after the pair
        small_size: int = 0  #: side of the small views (0 = half the crop size)
        small_scale: list[float] = field(default_factory=lambda: [0.05, 0.14])  #: area range of the small views

        def __post_init__(self) -> None:
            if self.num_views != 2:
                raise ConfigError(f"views.num_views must be 2 for views.planner=joint_crop (it draws one pair jointly; "
                                  f"add small views with views.num_small), got {self.num_views}")

    beta: float = 0.0
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    epsilon: float = 0.1
    fallback: str = "whole_image"
    num_small: int = 0
    small_scale: tuple[float, float] = (0.05, 0.14)
    small_size: int = 0
    _bound: float = field(init=False, repr=False, compare=False)
    _log_aspect: tuple[float, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta", _check_beta(self.beta))
        object.__setattr__(self, "scale", as_range(self.scale, "scale", 0.0, 1.0))
        object.__setattr__(self, "ratio", as_range(self.ratio, "ratio", 0.0, math.inf))
        object.__setattr__(self, "epsilon", _check_epsilon(self.epsilon, self.scale))
        if self.fallback not in FALLBACKS:
            raise ConfigError(f"fallback must be one of {list(FALLBACKS)}, got {self.fallback!r}")
        if isinstance(self.num_small, bool) or not isinstance(self.num_small, int) or self.num_small < 0:
            raise ConfigError(f"num_small must be a non-negative integer, got {self.num_small!r}")
        object.__setattr__(self, "small_scale", as_range(self.small_scale, "small_scale", 0.0, 1.0))
        object.__setattr__(self, "_bound", log_area_ratio_bound(self.scale, self.epsilon))
        # Same float32 log as torchvision and the released code.
        log_aspect = torch.log(torch.tensor(self.ratio))
        object.__setattr__(self, "_log_aspect", (float(log_aspect[0]), float(log_aspect[1])))

    @classmethod
    def from_settings(cls, settings: Settings, context: PlannerContext) -> JointCropPlanner:
        return cls(beta=settings.joint_beta, scale=tuple(settings.scale), ratio=tuple(settings.ratio),
                   epsilon=settings.joint_epsilon, fallback=settings.joint_fallback, num_small=settings.num_small,
                   small_scale=tuple(settings.small_scale), small_size=settings.small_size)

    @property
    def num_views(self) -> int:
        """Total number of views: the joint pair plus the small views."""
        return 2 + self.num_small

    def view_sizes(self, size: int) -> list[int]:
        """``size`` for the pair, the small side for the small views."""
        return [size, size] + [small_view_size(size, self.small_size)] * self.num_small

    def label(self) -> str:
        return f"beta {self.beta:g}"

    def independent(self) -> Planner:
        """Independent crops with the same scale, ratio and small views (JointBlur's ``either`` mode)."""
        if self.num_small:
            return MultiCropPlanner(num_large=2, num_small=self.num_small, large_scale=self.scale,
                                    small_scale=self.small_scale, ratio=self.ratio, small_size=self.small_size)
        return RandomResizedCropPlanner(num_views=2, scale=self.scale, ratio=self.ratio)

    @property
    def log_ratio_bound(self) -> float:
        """``L = log(smax / smin - epsilon)``, the bound on ``|log(s2 / s1)|``."""
        return self._bound

    def plan(
        self, index: int, width: int, height: int, generator: torch.Generator | None = None
    ) -> list[Box]:
        """Return the joint pair's two boxes, then ``num_small`` independent small boxes."""
        check_image_size(width, height)
        _, ratio, first = _draw_pair(self.beta, self._bound, self.scale, generator)
        target_first = (height * width) * first  # float32 pixels, as the released code
        target_second = target_first * ratio
        boxes = []
        for target in (target_first.item(), target_second.item()):
            box = _place(width, height, target, *self._log_aspect, generator)
            if box is None:
                box = (
                    whole_image_box(width, height)
                    if self.fallback == "whole_image"
                    else central_crop_box(width, height, self.ratio)
                )
            boxes.append(box)
        boxes += [
            sample_resized_crop(width, height, self.small_scale, self.ratio, generator)
            for _ in range(self.num_small)
        ]
        return boxes


    def plan_batch(self, index: torch.Tensor, width: int | torch.Tensor, height: int | torch.Tensor,
                   generator: torch.Generator, *, store_table: torch.Tensor | None = None) -> torch.Tensor:
        """The joint pair (each view's area fixed across its attempts), then the small views; ``[B, V, 4]``."""
        w_img, h_img = bs.batch_arguments(index, width, height, generator)
        batch = w_img.shape[0]
        _, first, second = sample_area_pair_batch(self.beta, self._bound, self.scale, (batch,), generator)
        fraction = torch.stack([first, second], dim=1)[..., None]  # [B, 2, 1]: the area is fixed per view
        w, h, fits = bs.attempt_sizes(fraction, w_img, h_img, self.ratio, generator)
        boxes = bs.place_uniform(w, h, w_img, h_img, generator)
        if self.fallback == "whole_image":
            fallback = bs.whole_image(w_img, h_img)
        else:
            fallback = bs.central_crop(w_img, h_img, self.ratio)
        boxes = torch.where(fits[..., None], boxes, fallback[:, None, :])
        if self.num_small == 0:
            return boxes
        small = bs.random_resized(w_img, h_img, self.num_small, self.small_scale, self.ratio, generator)
        return torch.cat([boxes, small], dim=1)


def _log_ratio_batch(beta: float, bound: float, size: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """The batched log ratio ``r`` on ``[-bound, bound]`` (the beta family; one uniform per variate).

    For ``beta != 0`` the truncated normal is drawn by inverting its CDF: with ``u`` uniform, the per-image law's
    ``p = 1/2 + (u - 1/2) Z`` (``Z = erf(|beta| / sqrt 2)``) is written through its lower tail,
    ``min(p, 1 - p) = (1 - Z) / 2 + Z min(u, 1 - u)``, so float32 keeps the tails accurate.
    """
    if beta == 0.0 or bound == 0.0:
        return bs.uniform(size, -bound, bound, generator)
    u = torch.rand(tuple(size), generator=generator, device=generator.device)
    z = math.erf(abs(beta) / math.sqrt(2.0))
    tail = 0.5 * math.erfc(abs(beta) / math.sqrt(2.0))
    sigma = bound / abs(beta)
    lower = torch.special.ndtri(tail + z * torch.minimum(u, 1.0 - u))  # <= 0
    x = torch.where(u < 0.5, sigma * lower, -sigma * lower).clamp(-bound, bound)
    if beta < 0:
        # Reflect each half towards its edge, as the per-image law.
        x = torch.where(x < 0, -bound - x, bound - x)
    return x


def sample_area_pair_batch(
    beta: float, bound: float, scale: tuple[float, float], size: Sequence[int], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """JointCrop(beta)'s ``(r, s1, s2)`` of shape ``size`` on the device: the batched :func:`sample_area_pair`.

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
    log_ratio = _log_ratio_batch(beta, bound, size, generator)
    ratio = torch.exp(log_ratio)
    low = torch.clamp_min(scale[0] / ratio, scale[0])
    high = torch.maximum(low, torch.clamp_max(scale[1] / ratio, scale[1]))
    first = low + (high - low) * torch.rand(tuple(size), generator=generator, device=generator.device)
    return log_ratio, first, first * ratio

def area_ratio_statistics(
    planner: Planner, n: int, width: int, height: int, generator: torch.Generator | None = None
) -> AreaRatioStatistics:
    """Median area ratio of a planner's first two boxes and the share of pairs more than 2x apart.

    For each of ``n`` plans on a ``width`` x ``height`` image, the ratio is ``max(a1 / a2, a2 / a1)`` with
    ``a1, a2`` the areas of boxes 0 and 1 (the joint pair of :class:`JointCropPlanner`, two independent crops
    of ``RandomResizedCropPlanner``). Compares JointCrop with independent crops (Zhang et al. 2025, appendix H).

    Args:
        planner: Any planner with at least two views.
        n: Number of pairs.
        width: Image width in pixels.
        height: Image height in pixels.
        generator: RNG to draw from; ``None`` uses torch's global RNG.

    Returns:
        ``AreaRatioStatistics(median, share_above_2, n)``.

    Raises:
        ValueError: If ``n < 1`` or the planner has fewer than two views.

    Example:
        >>> stats = area_ratio_statistics(JointCropPlanner(), 1000, 224, 224, torch.Generator().manual_seed(0))
        >>> stats.median > 1.0
        True
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if planner.num_views < 2:
        raise ValueError(f"the planner must plan at least two views, it plans {planner.num_views}")
    ratios = []
    above = 0
    for _ in range(n):
        boxes = planner.plan(0, width, height, generator)
        a1, a2 = box_area(boxes[0]), box_area(boxes[1])
        r = max(a1 / a2, a2 / a1)
        ratios.append(r)
        above += r > 2.0
    return AreaRatioStatistics(statistics.median(ratios), above / n, n)
