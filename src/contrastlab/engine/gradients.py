"""Gradient clipping before the optimiser step (``optim.clip_grad``, ``optim.clip_grad_mode``).

``global`` scales all gradients together so that their joint norm is at most the limit (PyTorch's
``clip_grad_norm_``, as MoCo v3 and the fine-tuning recipes use). ``per_parameter`` scales each parameter's
gradient by its own norm, ``g <- g * min(1, limit / (||g|| + 1e-6))``: DINO's ``clip_gradients`` (Caron et al.,
"Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021; facebookresearch/dino ``utils.py``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

CLIP_MODES = ("global", "per_parameter")


def clip_gradients(parameters: Iterable[torch.Tensor], limit: float, mode: str = "global") -> None:
    """Clip the gradients of ``parameters`` in place to ``limit`` (see the module docstring for ``mode``).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(3)); w.grad = torch.full((3,), 4.0)
        >>> clip_gradients([w], 1.0, "per_parameter"); round(float(w.grad.norm()), 4)
        1.0
    """
    if mode not in CLIP_MODES:
        raise ValueError(f"optim.clip_grad_mode must be one of {', '.join(CLIP_MODES)}, got {mode!r}")
    if mode == "global":
        nn.utils.clip_grad_norm_(list(parameters), limit)
        return
    for p in parameters:
        if p.grad is not None:
            scale = limit / (torch.linalg.vector_norm(p.grad.detach()) + 1e-6)
            p.grad.mul_(scale.clamp(max=1.0))
