"""Per-image crop boxes that a localiser refreshes and a planner reads: ContrastiveCrop's box store.

ContrastiveCrop (Peng, Wang, Zhu, You, "Crafting Better Contrastive Views for Siamese Representation
Learning", CVPR 2022, section 3.2) keeps one bounding box per training image. Every box starts as the whole
image; every few epochs the encoder's own heatmap replaces it (:func:`contrastlab.views.localiser.localise`),
and the crop planner (:class:`contrastlab.views.planners.contrastive_crop.ContrastiveCropPlanner`) draws crops
around it. Boxes are stored *normalised*, ``(x0, y0, x1, y1)`` with ``0 <= x0 <= x1 <= 1`` and
``0 <= y0 <= y1 <= 1``, so one table serves an image at any resolution; :meth:`BoxStore.box` converts a row
to source pixels. A localised box may have zero width or height: upstream's far edges (``last index / size``,
the localiser's ``edges="released"``) give ``x0 == x1`` where a single column passes the threshold, and upstream
keeps training with that box, so the table accepts it (an initial box, :class:`ConstantBox` included, must still
have an area).

Reaching the DataLoader workers. Planners run inside DataLoader worker processes, which hold their own copy
of the dataset. The table therefore lives in shared memory (``Tensor.share_memory_()``) and every write
happens *in place* (:meth:`BoxStore.update`, :meth:`BoxStore.fill`, :meth:`BoxStore.load_state_dict`), so
workers, forked or spawned, persistent or not, read the new boxes. (Upstream rebinds ``train_set.boxes``
to a new tensor, which only works because its workers are re-created every epoch.) Write between epochs,
before the loader's next ``iter()``: with persistent workers, prefetching for an epoch starts at ``iter()``.
A row read while it is being written is made a valid box anyway (edges sorted and clipped).

The store also carries a shared ``enabled`` flag: upstream trains its warm-up epochs with plain random
resized crops and switches to ContrastiveCrop afterwards; a planner reading a disabled store does the same,
and the switch reaches persistent workers like the boxes do.

Pickling: ``torch.multiprocessing`` (which DataLoader uses to start workers) pickles the shared tensors
by handle, so spawned workers share the table too. The plain :mod:`pickle` module copies the data instead:
the copy gets shared memory of its own, no longer linked to the original.

Example:
    >>> store = BoxStore(3)
    >>> store.box(1, width=64, height=32)
    (0.0, 0.0, 64.0, 32.0)
    >>> store.update([1], torch.tensor([[0.25, 0.5, 0.75, 1.0]]))
    >>> store.box(1, width=64, height=32)
    (16.0, 16.0, 48.0, 32.0)
    >>> round(store.mean_area(), 4)
    0.75
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from contrastlab.errors import CheckpointError, ConfigError
from contrastlab.views.boxes import Box

WHOLE_IMAGE: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
"""The normalised box of the whole image, every box's initial value."""


@runtime_checkable
class BoxSource(Protocol):
    """What a box-reading planner needs: a box per sample index, and whether to use it at all."""

    @property
    def enabled(self) -> bool:
        """False: planners fall back to plain random resized crops (upstream's warm-up epochs)."""
        ...

    def box(self, index: int, width: int, height: int) -> Box:
        """The box of sample ``index`` in the pixels of a ``width`` x ``height`` image."""
        ...


def _normalised_box(box: Sequence[float], what: str) -> tuple[float, float, float, float]:
    """Validate one normalised box; raises ConfigError."""
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} must be four numbers (x0, y0, x1, y1), got {box!r}") from exc
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{what} must be four finite numbers (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = values
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ConfigError(f"{what} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {box!r}")
    return x0, y0, x1, y1


def _check_table(boxes: torch.Tensor, what: str) -> torch.Tensor:
    """Validate a ``[K, 4]`` table of normalised boxes (zero width or height allowed); float32 on the CPU."""
    if not isinstance(boxes, torch.Tensor):
        boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{what} must have shape [K, 4] (x0, y0, x1, y1), got {tuple(boxes.shape)}")
    boxes = boxes.detach().to(device="cpu", dtype=torch.float32)
    x0, y0, x1, y1 = boxes.unbind(1)
    ok = torch.isfinite(boxes).all(1) & (x0 >= 0) & (y0 >= 0) & (x0 <= x1) & (y0 <= y1) & (x1 <= 1) & (y1 <= 1)
    if not bool(ok.all()):
        row = int((~ok).nonzero()[0])
        raise ValueError(
            f"{what}: row {row} is {boxes[row].tolist()}, but normalised boxes need "
            "0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1"
        )
    return boxes


class BoxStore:
    """One normalised box per sample, in shared memory, read by planners in DataLoader workers.

    Args:
        num_samples: Number of samples ``N`` (rows); planners index it with the dataset's ``index``.
        init_box: Normalised ``(x0, y0, x1, y1)`` every row starts from; the whole image by default
            (ContrastiveCrop), ``(0.25, 0.25, 0.75, 0.75)`` for SimCCrop's central box.
        enabled: Whether planners use the boxes now (False during upstream's warm-up epochs).

    Raises:
        ConfigError: ``num_samples`` is not a positive integer or ``init_box`` is not a valid box.

    Example:
        >>> store = BoxStore(10, enabled=False)  # warm-up: plain random resized crops
        >>> store.fill(torch.tensor([[0.25, 0.5, 0.75, 1.0]]).repeat(10, 1))
        >>> store.set_enabled(True)
        >>> store.box(0, 100, 100)
        (25.0, 50.0, 75.0, 100.0)
    """

    def __init__(
        self, num_samples: int, init_box: Sequence[float] = WHOLE_IMAGE, enabled: bool = True
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ConfigError(f"num_samples must be a positive integer, got {num_samples!r}")
        box = _normalised_box(init_box, "init_box")
        self._boxes = torch.tensor(box, dtype=torch.float32).repeat(num_samples, 1).share_memory_()
        self._enabled = torch.tensor([bool(enabled)], dtype=torch.uint8).share_memory_()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch.multiprocessing hands over the shared tensors themselves (no-op below); a plain pickle
        # copy gets shared memory of its own, so workers forked from its process still see its updates.
        self.__dict__.update(state)
        self._boxes.share_memory_()
        self._enabled.share_memory_()

    def __len__(self) -> int:
        return self._boxes.shape[0]

    def __repr__(self) -> str:
        return f"BoxStore(num_samples={len(self)}, enabled={self.enabled}, mean_area={self.mean_area():.4f})"

    @property
    def table(self) -> torch.Tensor:
        """The shared ``[N, 4]`` float32 table itself. Read it; write through ``update``/``fill`` only."""
        return self._boxes

    @property
    def enabled(self) -> bool:
        """Whether planners use the boxes (shared with the workers like the table)."""
        return bool(self._enabled[0])

    def set_enabled(self, enabled: bool) -> None:
        """Switch the boxes on or off for every worker (in place)."""
        self._enabled[0] = int(bool(enabled))

    def is_shared(self) -> bool:
        """Whether the table lives in shared memory (it always does unless a caller replaced it)."""
        return self._boxes.is_shared() and self._enabled.is_shared()

    def box(self, index: int, width: int, height: int) -> Box:
        """Box of sample ``index`` in the pixels of a ``width`` x ``height`` image.

        A row caught half-written by a concurrent update is still turned into a valid box: the edges are
        clipped to ``[0, 1]`` and sorted, and an axis with a NaN edge becomes the whole axis. A zero-width (or
        zero-height) box stays one, as the released edges give it.
        """
        x0, y0, x1, y1 = self._boxes[int(index)].tolist()
        x0, x1 = sorted((min(max(x0, 0.0), 1.0), min(max(x1, 0.0), 1.0)))
        y0, y1 = sorted((min(max(y0, 0.0), 1.0), min(max(y1, 0.0), 1.0)))
        if not x0 <= x1:  # NaN
            x0, x1 = 0.0, 1.0
        if not y0 <= y1:
            y0, y1 = 0.0, 1.0
        return (x0 * width, y0 * height, x1 * width, y1 * height)

    def update(self, indices: Sequence[int] | torch.Tensor, boxes: torch.Tensor) -> None:
        """Overwrite the rows ``indices`` with normalised ``boxes [K, 4]``, in place.

        Raises:
            IndexError: An index lies outside ``[0, N)``.
            ValueError: Shapes disagree, or a box is not a valid normalised box.
        """
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()
        boxes = _check_table(boxes, "boxes")
        if boxes.shape[0] != idx.numel():
            raise ValueError(f"{idx.numel()} indices but {boxes.shape[0]} boxes")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"box indices must lie in [0, {len(self)}), got {idx.min()}..{idx.max()}")
        self._boxes[idx] = boxes

    def fill(self, boxes: torch.Tensor) -> None:
        """Replace the whole table with ``boxes [N, 4]`` (what ``localise`` returns), in place.

        Raises:
            ValueError: Wrong shape, or a row is not a valid normalised box.
        """
        boxes = _check_table(boxes, "boxes")
        if boxes.shape[0] != len(self):
            raise ValueError(f"the store has {len(self)} rows but {boxes.shape[0]} boxes were given")
        self._boxes.copy_(boxes)

    def mean_area(self) -> float:
        """Mean box area as a fraction of the image area (1.0 while every box is the whole image)."""
        b = self._boxes
        return float(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).mean())

    def state_dict(self) -> dict[str, Any]:
        """``{"boxes": [N, 4] copy, "enabled": bool}``, for the training checkpoint."""
        return {"boxes": self._boxes.clone(), "enabled": self.enabled}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` in place (workers keep seeing the table).

        Raises:
            CheckpointError: The state is malformed or holds a different number of samples.
        """
        if "boxes" not in state:
            raise CheckpointError(
                "box store state has no 'boxes' entry; was it written by BoxStore.state_dict?"
            )
        boxes = torch.as_tensor(state["boxes"])
        if boxes.dim() != 2 or boxes.shape[0] != len(self):
            raise CheckpointError(
                f"the checkpoint holds boxes of shape {tuple(boxes.shape)}, but this dataset has "
                f"{len(self)} samples; resume with the dataset the run was trained on"
            )
        try:
            self.fill(boxes)
        except ValueError as exc:
            raise CheckpointError(f"the checkpoint's boxes are invalid: {exc}") from exc
        if "enabled" in state:
            self.set_enabled(bool(state["enabled"]))


@dataclass(frozen=True)
class ConstantBox:
    """The same normalised box for every sample; no localiser. SimCCrop's store.

    Args:
        normalised: The normalised box ``(x0, y0, x1, y1)``.

    Example:
        >>> ConstantBox((0.25, 0.25, 0.75, 0.75)).box(index=5, width=32, height=32)
        (8.0, 8.0, 24.0, 24.0)
    """

    normalised: tuple[float, float, float, float] = (0.25, 0.25, 0.75, 0.75)

    def __post_init__(self) -> None:
        object.__setattr__(self, "normalised", _normalised_box(self.normalised, "box"))

    @property
    def enabled(self) -> bool:
        """Always True: a constant box needs no warm-up."""
        return True

    def box(self, index: int, width: int, height: int) -> Box:
        """The constant box in the pixels of a ``width`` x ``height`` image (``index`` is ignored)."""
        x0, y0, x1, y1 = self.normalised
        return (x0 * width, y0 * height, x1 * width, y1 * height)

    def mean_area(self) -> float:
        """Area of the box as a fraction of the image area."""
        x0, y0, x1, y1 = self.normalised
        return (x1 - x0) * (y1 - y0)
