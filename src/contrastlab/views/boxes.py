"""Crop boxes: the one currency every planner produces and every renderer consumes.

A box is ``(x0, y0, x1, y1)`` in source-image pixels, with ``0 <= x0 < x1 <= width`` and
``0 <= y0 < y1 <= height``, except for planners that pad (``PaddedCropPlanner``): their boxes may leave
the image, and the renderer fills what lies outside with zeros. Coordinates are floats so that planners can express sub-pixel geometry; the
CPU renderer snaps them to the pixel grid with :func:`box_to_pixels`, which is exact for the integer-valued
boxes that torchvision-compatible planners (SimCLR's random resized crop, Chen et al. 2020) produce.

Example:
    >>> box = (10.0, 20.0, 60.0, 80.0)
    >>> box_area(box)
    3000.0
    >>> box_to_pixels(box)
    (20, 10, 60, 50)
"""

from __future__ import annotations

import math

Box = tuple[float, float, float, float]
"""``(x0, y0, x1, y1)`` in source pixels."""


def validate_box(
    box: Box, width: int | None = None, height: int | None = None, allow_outside: bool = False
) -> Box:
    """Check that ``box`` is a finite, non-empty box, optionally inside a ``width`` x ``height`` image.

    Args:
        box: Four numbers ``(x0, y0, x1, y1)``.
        width: Image width in pixels; when given, ``x1 <= width`` is required.
        height: Image height in pixels; when given, ``y1 <= height`` is required.
        allow_outside: accept a box that leaves the image (zero padding: ``RandomCrop(padding=p)``);
            it must still overlap the image.

    Returns:
        The box as a tuple of four floats.

    Raises:
        ValueError: If the box has the wrong length, is not finite, is empty, or leaves the image.
    """
    if len(box) != 4:
        raise ValueError(f"a box has four coordinates (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"box coordinates must be finite, got {box!r}")
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"box must satisfy x0 < x1 and y0 < y1, got {box!r}")
    if allow_outside:
        if x1 <= 0 or y1 <= 0 or (width is not None and x0 >= width) or (height is not None and y0 >= height):
            raise ValueError(f"box {box!r} does not overlap the {width}x{height} image")
        return (x0, y0, x1, y1)
    if x0 < 0 or y0 < 0:
        raise ValueError(f"box must start inside the image (x0, y0 >= 0), got {box!r}")
    if width is not None and x1 > width:
        raise ValueError(f"box {box!r} extends past the image width {width}")
    if height is not None and y1 > height:
        raise ValueError(f"box {box!r} extends past the image height {height}")
    return (x0, y0, x1, y1)


def box_area(box: Box) -> float:
    """Area of ``box`` in square pixels (zero for an empty or inverted box)."""
    x0, y0, x1, y1 = box
    return max(0.0, x1 - x0) * max(0.0, y1 - y0)


def whole_image_box(width: int, height: int) -> Box:
    """The box covering a whole ``width`` x ``height`` image."""
    return (0.0, 0.0, float(width), float(height))


def clip_box(box: Box, width: int, height: int) -> Box:
    """Clip ``box`` to the ``width`` x ``height`` image; the result may be empty (check with ``box_area``)."""
    x0, y0, x1, y1 = box
    return (
        min(max(float(x0), 0.0), float(width)),
        min(max(float(y0), 0.0), float(height)),
        min(max(float(x1), 0.0), float(width)),
        min(max(float(y1), 0.0), float(height)),
    )


def box_from_pixels(top: int, left: int, height: int, width: int) -> Box:
    """Convert torchvision's crop parameters ``(top, left, height, width)`` to a box."""
    return (float(left), float(top), float(left + width), float(top + height))


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def box_to_pixels(box: Box) -> tuple[int, int, int, int]:
    """Snap ``box`` to the pixel grid as torchvision's crop parameters ``(top, left, height, width)``.

    Each edge is rounded to the nearest integer (halves up); the crop keeps at least one pixel per side.
    Integer-valued boxes convert exactly, so ``box_to_pixels(box_from_pixels(*p)) == p``.
    """
    x0, y0, x1, y1 = box
    left, top = _round_half_up(x0), _round_half_up(y0)
    right, bottom = _round_half_up(x1), _round_half_up(y1)
    return top, left, max(1, bottom - top), max(1, right - left)
