"""The CPU renderer: crop a planned box out of a PIL image and resize it to the view's size.

Rendering is shared by every planner (crops are boxes). The box is snapped to the pixel grid
(:func:`~contrastlab.views.boxes.box_to_pixels`), cropped, then resized with PIL's antialiased bilinear
filter, which is exactly ``torchvision.transforms.functional.resized_crop`` on those integer parameters, the
operation behind SimCLR's random resized crop (Chen et al. 2020).

Example:
    >>> from PIL import Image
    >>> render_box(Image.new("RGB", (40, 30)), (5.0, 5.0, 25.0, 25.0), 16).size
    (16, 16)
"""

from __future__ import annotations

from PIL import Image

from contrastlab.views.boxes import Box, box_to_pixels


def render_box(image: Image.Image, box: Box, size: int) -> Image.Image:
    """Crop ``box`` from ``image`` and resize it to ``size`` x ``size`` (bilinear, antialiased).

    Args:
        image: Source image.
        box: ``(x0, y0, x1, y1)`` in source pixels; fractional edges are rounded to whole pixels. Parts
            of the box outside the image are zero (black), as ``RandomCrop(padding=p)`` pads.
        size: Output side length in pixels.

    Returns:
        The rendered view, a PIL image of the same mode as ``image``.
    """
    if size < 1:
        raise ValueError(f"view size must be positive, got {size}")
    top, left, height, width = box_to_pixels(box)
    crop = image.crop((left, top, left + width, top + height))
    return crop.resize((size, size), Image.Resampling.BILINEAR)
