"""Batched image decoding on the training device (torchvision's nvJPEG decoder), with a CPU fallback.

ImageNet-style folders cannot live on the GPU, but their decoding can: the files' bytes are read by DataLoader
workers (cheap), then a whole batch is decoded at once by ``torchvision.io.decode_jpeg(..., device="cuda")`` and
padded into one canvas ``[B, 3, H_max, W_max]`` that the batched renderer crops from (each box lies inside its own
image). Where no GPU decoder is available (a CPU device, or a torchvision built without nvJPEG) the batch is
decoded on the CPU, with a message saying so once.

Example:
    >>> from torchvision.io import encode_jpeg
    >>> blobs = [encode_jpeg(torch.zeros(3, 20, 30, dtype=torch.uint8)), encode_jpeg(torch.zeros(3, 24, 16,
    ...          dtype=torch.uint8))]
    >>> canvas, sizes = decode_batch(blobs, torch.device("cpu"))
    >>> tuple(canvas.shape), sizes.tolist()
    ((2, 3, 24, 30), [[20, 30], [24, 16]])
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

_warned: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(message, file=sys.stderr, flush=True)


def is_jpeg(blob: torch.Tensor) -> bool:
    """Whether a file's bytes (a CPU uint8 tensor) start with the JPEG start-of-image marker."""
    return blob.numel() > 2 and int(blob[0]) == 0xFF and int(blob[1]) == 0xD8


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """A decoded image as uint8: torchvision decodes 16-bit PNGs to uint16, of which the high byte is kept
    (``v >> 8``, as PIL reduces 16-bit colour PNGs and :func:`contrastlab.data.base.to_rgb` 16-bit grayscale)."""
    if image.dtype == torch.uint16:
        return (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


def decode_images(blobs: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Decode image files' bytes to uint8 RGB images ``[3, H, W]`` on ``device``.

    JPEGs go to the GPU decoder in one call when ``device`` is a GPU; other formats (PNG, ...), and every file
    when there is no GPU decoder, are decoded on the CPU (a message says so once). 16-bit PNGs are reduced to
    8 bits (:func:`to_uint8`).

    Raises:
        RuntimeError: A file could not be decoded (torchvision's message).
    """
    blobs = list(blobs)
    out: list[torch.Tensor | None] = [None] * len(blobs)
    jpegs = [k for k, blob in enumerate(blobs) if is_jpeg(blob)]
    if device.type == "cuda" and jpegs:
        try:
            for k, image in zip(jpegs, decode_jpeg([blobs[k] for k in jpegs], mode=ImageReadMode.RGB,
                                                   device=device)):
                out[k] = image
        except (RuntimeError, TypeError) as exc:
            _say_once(f"GPU JPEG decoding failed ({exc}); decoding on the CPU instead. A torchvision built with "
                      "nvJPEG (the CUDA wheels are) decodes on the GPU.")
    elif device.type != "cuda":
        _say_once(f"no GPU JPEG decoder on a {device.type} device: decoding on the CPU")
    for k, blob in enumerate(blobs):
        if out[k] is None:
            out[k] = to_uint8(decode_image(blob, mode=ImageReadMode.RGB)).to(device, non_blocking=True)
    return out  # type: ignore[return-value]


def pad_to_canvas(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images of different sizes into a zero canvas ``[B, C, H_max, W_max]``; also their ``[B, 2]`` (h, w)."""
    if not images:
        raise ValueError("pad_to_canvas needs at least one image")
    height = max(int(im.shape[-2]) for im in images)
    width = max(int(im.shape[-1]) for im in images)
    canvas = images[0].new_zeros(len(images), images[0].shape[0], height, width)
    for b, im in enumerate(images):
        canvas[b, :, : im.shape[-2], : im.shape[-1]] = im
    sizes = torch.tensor([[im.shape[-2], im.shape[-1]] for im in images], dtype=torch.long)
    return canvas, sizes.to(canvas.device, non_blocking=True)


def decode_batch(blobs: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a batch of JPEG byte tensors on ``device`` into a canvas and the image sizes (see the module doc)."""
    return pad_to_canvas(decode_images(blobs, device))
