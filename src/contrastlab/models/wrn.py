"""Pre-activation Wide Residual Networks for CIFAR (WRN-16-2, WRN-40-2, WRN-28-4, ...).

Zagoruyko and Komodakis, "Wide Residual Networks", BMVC 2016: a 3x3 convolution with 16 channels, three
groups of ``n`` pre-activation blocks (BN-ReLU-conv3x3, BN-ReLU-[dropout]-conv3x3) with ``16k``, ``32k``
and ``64k`` channels (the first block of groups 2 and 3 has stride 2), a final BN-ReLU and global
average pooling; depth ``6n + 4``. Where a block changes the shape, the shortcut is a 1x1 convolution
applied to the pre-activated input.

This is the WRN that Mutual Contrastive Learning ships (Yang et al., AAAI 2022;
github.com/winycg/MCL), with dropout 0. Initialisation: convolutions He-normal with ``fan_out = k * k * out_channels``,
BatchNorm scale 1 and shift 0. Upstream writes that rule two ways (by hand for independent peers,
``kaiming_normal_(mode="fan_out")`` for the shared-trunk network); both draw from the same distribution.

Stages (:mod:`contrastlab.models.staged`): ``stem`` (conv1), ``block1``, ``block2``, ``block3``,
``norm`` (the final BN and ReLU), ``pool``; upstream MCL shares ``stem`` and ``block1``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from contrastlab.models.init import kaiming_init_
from contrastlab.models.staged import FLATTEN, StageSpec

__all__ = ["PreActBlock", "WideResNet", "wide_resnet"]


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-dropout-conv3x3, added to the (projected) input.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        stride: stride of the first convolution (and of the shortcut).
        dropout: dropout probability between the two convolutions.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        # The projection sees the pre-activated input; the identity shortcut sees the raw input.
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.relu2(self.bn2(self.conv1(out)))
        out = self.conv2(self.dropout(out))
        return out + residual


class WideResNet(nn.Module):
    """Pre-activation WideResNet feature extractor: ``[B, 3, H, W] -> [B, 64 * widen_factor]``.

    Args:
        depth: ``6n + 4`` (16, 28, 40, ...).
        widen_factor: ``k``; the groups have ``16k``, ``32k`` and ``64k`` channels.
        dropout: dropout probability inside each block (0 in MCL).
        zero_init_residual: start every block's second BN with zero scale; the residual branch then
            outputs zero and each block begins as the identity (upstream MCL's option for its
            shared-trunk WRN).

    Example:
        >>> net = WideResNet(10, widen_factor=1)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 64])
    """

    stage_spec: ClassVar[StageSpec] = (
        ("stem", ("conv1",)),
        ("block1", ("block1",)),
        ("block2", ("block2",)),
        ("block3", ("block3",)),
        ("norm", ("bn", "relu")),
        ("pool", ("avgpool", FLATTEN)),
    )
    upstream_shared_until: ClassVar[str] = "block1"

    def __init__(
        self, depth: int, widen_factor: int, dropout: float = 0.0, zero_init_residual: bool = False
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        groups = []
        in_channels = 16
        for i, out_channels in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(PreActBlock(in_channels, out_channels, stride, dropout))
                in_channels = out_channels
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_channels

        kaiming_init_(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, PreActBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.block3(self.block2(self.block1(x)))
        x = self.relu(self.bn(x))
        return torch.flatten(self.avgpool(x), 1)


def wide_resnet(
    depth: int, widen_factor: int, dropout: float = 0.0, zero_init_residual: bool = False
) -> WideResNet:
    """Build a :class:`WideResNet` (WRN-``depth``-``widen_factor``)."""
    return WideResNet(depth, widen_factor, dropout=dropout, zero_init_residual=zero_init_residual)
