"""One backbone call per run of same-sized crops: how DINO's and SwAV's released code push multi-crop batches.

``MultiCropWrapper`` in ``utils.py`` of github.com/facebookresearch/dino (Caron et al., ICCV 2021; SwAV's
``resnet50.py`` does the same, Caron et al., NeurIPS 2020) concatenates consecutive crops of one resolution (the 2
global crops, then the local crops) and runs the backbone once per group. The features are the same as one call
per crop for networks whose samples do not interact, but a BatchNorm in training mode normalises over the whole
group: the global crops share their statistics, as do the local ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["forward_by_resolution", "resolution_groups"]


def resolution_groups(views: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """``(start, end)`` index ranges of the runs of consecutive views with the same spatial size.

    Example:
        >>> views = [torch.zeros(2, 3, 8, 8)] * 2 + [torch.zeros(2, 3, 4, 4)] * 3
        >>> resolution_groups(views)
        [(0, 2), (2, 5)]
    """
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(views) + 1):
        if i == len(views) or views[i].shape[-2:] != views[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


def forward_by_resolution(net: nn.Module, views: Sequence[torch.Tensor]) -> torch.Tensor:
    """``net`` on every view, one call per group of :func:`resolution_groups`; features ``[V * B, D]`` in view order
    (rows ``v * B .. (v + 1) * B - 1`` belong to view ``v``)."""
    return torch.cat([net(torch.cat(list(views[a:b]))) for a, b in resolution_groups(views)])
