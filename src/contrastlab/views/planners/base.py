"""The crop-law interface: one class per law, holding its config keys, view sizes, per-image and batched laws.

Crops are boxes (``docs/architecture.md``): a planner decides where each view's crop lies and never touches
pixels, so one planner serves the CPU renderer in DataLoader workers and the batched renderer on the device, and
tests check its distribution directly. A planner class (a :class:`Planner` subclass registered with
:func:`contrastlab.register_planner`, selected by ``views.planner``) holds everything about its law:

- ``Settings``: a dataclass of its config keys (``views.<key>``) with their types and defaults; the config loader
  checks a recipe's ``views`` keys against it and fills in the defaults;
- :meth:`Planner.from_settings`: the planner from those settings and the run's :class:`PlannerContext`;
- :meth:`Planner.view_sizes`: the output side of each view;
- :meth:`Planner.plan`: the boxes of one image (CPU workers, Python control flow);
- :meth:`Planner.plan_batch`: the boxes of a batch drawn with tensor operations on the generator's device, with the
  same distribution as :meth:`Planner.plan` (not the same numbers) and no host synchronisation. The default runs
  :meth:`Planner.plan` image by image on the host: correct, but it waits for the device; the built-in planners
  draw their batched law natively.

The batched law never waits for the device: no ``.item()``, ``.tolist()``, ``.cpu()``, no ``bool``/``int``/``float``
of a tensor, no ``nonzero`` or boolean-mask indexing, no shape or Python branch that depends on tensor values. Its
functions are named ``plan_batch`` or ``*_batch`` (or live in :mod:`~contrastlab.views.planners.batch_sampling`),
and the test suite checks them by that name, statically and at run time.

Randomness: ``generator=None`` in :meth:`Planner.plan` draws from torch's global RNG (which ``DataLoader`` seeds
per worker); pass a ``torch.Generator`` to draw from an explicit stream instead.

Example:
    >>> from contrastlab.views.planners import RandomResizedCropPlanner
    >>> planner = RandomResizedCropPlanner(num_views=2)
    >>> boxes = planner.plan(index=0, width=64, height=48, generator=torch.Generator().manual_seed(0))
    >>> len(boxes)
    2
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from contrastlab.errors import ConfigError
from contrastlab.views.boxes import Box

__all__ = ["DEFAULT_LOCALISATION", "Localisation", "NoSettings", "Planner", "PlannerContext", "as_range", "check_image_size",
           "check_num_views"]


@dataclass(frozen=True)
class PlannerContext:
    """What a planner may need to know about the run when it is built from the config.

    Attributes:
        image_size: Side of the (large) training views, ``data.image_size`` or the dataset's native size.
        num_images: Number of training images (a per-image box store has one row each).
    """

    image_size: int
    num_images: int


@dataclass(frozen=True)
class Localisation:
    """When and how a localiser refreshes a planner's box store (ContrastiveCrop's schedule).

    Attributes:
        warmup_epochs: Epochs of plain random crops before the first localisation.
        every: Epochs between localisations after the warm-up.
        threshold: Heatmap threshold of the box.
        heatmap: Heatmap kind (:data:`contrastlab.views.localiser.HEATMAPS`).
        edges: Far box edges (:data:`contrastlab.views.localiser.BOX_EDGES`): ``exclusive`` or ContrastiveCrop's
            ``released`` ``last index / size``.
    """

    warmup_epochs: int
    every: int
    threshold: float
    heatmap: str
    edges: str = "exclusive"


DEFAULT_LOCALISATION = Localisation(warmup_epochs=0, every=1, threshold=0.1, heatmap="channel_sum")
"""ContrastiveCrop's released heatmap and threshold (for heatmaps drawn without a localised planner)."""


@dataclass
class NoSettings:
    """A planner with no config keys."""


def check_num_views(num_views: int, name: str = "num_views") -> None:
    """ConfigError unless ``num_views`` is a positive integer."""
    if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
        raise ConfigError(f"{name} must be a positive integer, got {num_views!r}")


def check_image_size(width: int, height: int) -> None:
    """ValueError unless both sides are positive."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")


def as_range(value: Sequence[float], name: str, low: float, high: float) -> tuple[float, float]:
    """Validate a ``(min, max)`` pair with ``low < min <= max <= high``."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a pair (min, max), got {value!r}") from exc
    if not (low < lo <= hi <= high):
        raise ConfigError(f"{name} must satisfy {low} < min <= max <= {high}, got {value!r}")
    return lo, hi


class Planner:
    """Base class of crop laws (see the module docstring). Subclasses set ``num_views`` and implement :meth:`plan`.

    Class attributes:
        Settings: Dataclass of the planner's ``views.*`` config keys (:class:`NoSettings` if none).
        pads: Boxes may leave the image (the renderer fills the outside with zeros, ``padding`` pixels at most).

    Attributes a planner may expose:
        store: A per-image box store (:class:`~contrastlab.views.box_store.BoxStore`) that a localiser refreshes.
        localisation: The :class:`Localisation` schedule of that store.
    """

    Settings: ClassVar[type] = NoSettings
    pads: ClassVar[bool] = False
    num_views: int
    padding: int = 0
    store: Any = None
    localisation: Localisation | None = None

    @classmethod
    def from_settings(cls, settings: Any, context: PlannerContext) -> Planner:
        """The planner configured by ``settings`` (an instance of :attr:`Settings`); by default the settings are
        the constructor's keyword arguments."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)})

    @classmethod
    def smoke_overrides(cls, small_input: bool) -> list[str]:
        """Extra ``key=value`` overrides that ``--smoke`` adds for this planner (``small_input``: the smoke run's
        images are 16 px, else 32 px), e.g. two one-step epochs so that a localiser runs between them."""
        return []

    def view_sizes(self, size: int) -> list[int]:
        """The side of each view, given the side ``size`` of the large views."""
        return [size] * self.num_views

    def label(self) -> str:
        """A short description of the law's own setting for figure titles (``"beta -2"``), or ``""``."""
        return ""

    def independent(self) -> Planner | None:
        """The planner of independent crops with the same views, for JointBlur's ``either`` mode (JointCrop only)."""
        return None

    def plan(self, index: int, width: int, height: int, generator: torch.Generator | None = None) -> list[Box]:
        """Return ``num_views`` boxes ``(x0, y0, x1, y1)`` in source pixels for sample ``index`` of size
        ``width`` x ``height``."""
        raise NotImplementedError

    def plan_batch(self, index: torch.Tensor, width: int | torch.Tensor, height: int | torch.Tensor,
                   generator: torch.Generator, *, store_table: torch.Tensor | None = None) -> torch.Tensor:
        """Boxes ``[B, num_views, 4]`` float32 on ``generator.device`` for the samples ``index [B]``.

        This default plans each image on the host with :meth:`plan`, from a CPU generator seeded by one draw of
        ``generator``: the same law, but it reads the device (a host synchronisation per batch). Built-in planners
        override it with a native batched law.

        Args:
            index: Dataset indices ``[B]`` (long) on the generator's device.
            width: Image width: an int, or a ``[B]`` tensor of per-image widths.
            height: Image height, likewise.
            generator: RNG of every draw; the boxes live on its device.
            store_table: A box store's table already on the device (planners with a store); None reads the store.
        """
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        host = torch.Generator().manual_seed(seed)
        batch = index.shape[0]
        widths = width.tolist() if isinstance(width, torch.Tensor) and width.dim() else [int(width)] * batch
        heights = height.tolist() if isinstance(height, torch.Tensor) and height.dim() else [int(height)] * batch
        boxes = [self.plan(int(i), int(w), int(h), host) for i, w, h in zip(index.tolist(), widths, heights)]
        return torch.tensor(boxes, dtype=torch.float32, device=generator.device).reshape(batch, self.num_views, 4)


def small_view_size(size: int, small_size: int) -> int:
    """The side of multi-crop's small views: ``small_size``, or half the large side (at least 8) when 0."""
    return small_size or max(8, size // 2)


def finite_positive(value: float, name: str) -> float:
    """``value`` as a float; ConfigError unless finite and positive."""
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    return value
