"""Exponential moving averages of parameters: the momentum encoders of MoCo and BYOL.

MoCo (He et al. 2020) and BYOL (Grill et al. 2020) keep a second copy of the encoder whose parameters
follow the online ones by ``target <- m * target + (1 - m) * online``. Only parameters are averaged:
buffers such as BatchNorm running statistics of the momentum encoder come from its own forward passes,
as in both reference implementations.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["copy_params_", "ema_update_", "momentum_copy"]


@torch.no_grad()
def ema_update_(target: Iterable[torch.Tensor], online: Iterable[torch.Tensor], momentum: float) -> None:
    """In place, ``target = momentum * target + (1 - momentum) * online`` for every pair.

    Args:
        target: tensors updated in place (the momentum encoder's parameters).
        online: tensors of the same shapes (the online encoder's parameters).
        momentum: ``m`` in ``[0, 1]``; 1 keeps the target, 0 copies the online tensors.

    Example:
        >>> online, target = nn.Linear(4, 4), nn.Linear(4, 4)
        >>> ema_update_(target.parameters(), online.parameters(), momentum=0.99)
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    targets = list(target)
    onlines = list(online)
    if len(targets) != len(onlines):
        raise ValueError(f"target has {len(targets)} tensors, online has {len(onlines)}")
    if not targets:
        return
    torch._foreach_mul_(targets, momentum)
    torch._foreach_add_(targets, onlines, alpha=1.0 - momentum)


@torch.no_grad()
def copy_params_(target: Iterable[torch.Tensor], online: Iterable[torch.Tensor]) -> None:
    """In place, ``target = online`` for every pair (initialises a momentum encoder)."""
    targets = list(target)
    onlines = list(online)
    if len(targets) != len(onlines):
        raise ValueError(f"target has {len(targets)} tensors, online has {len(onlines)}")
    for t, o in zip(targets, onlines):
        t.copy_(o)


def momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters take no gradient (a momentum encoder)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target
