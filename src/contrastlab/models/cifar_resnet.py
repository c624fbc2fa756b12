"""CIFAR ResNets of He et al. 2016 (ResNet-20/32/56), with a width multiplier.

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2: a 3x3 stem
with 16 channels, three stages of ``n`` BasicBlocks with 16, 32 and 64 channels (the first block of
stages 2 and 3 halves the resolution), global average pooling; depth ``6n + 2``.

Where a block changes shape the shortcut is a 1x1 convolution followed by BatchNorm (the paper's
option B), not the zero-padded identity (option A). This matches the CIFAR ResNets that MCL ships
(``shared/reference/mcl.md``, section 5).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "CifarResNet", "cifar_resnet"]


def _scaled(channels: int, width: float) -> int:
    """Channels after applying the width multiplier (at least one)."""
    return max(1, round(channels * width))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (projection shortcut when the shape changes).

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        stride: stride of the first convolution (and of the shortcut).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet feature extractor: ``[B, 3, H, W] -> [B, 64 * width]``.

    Args:
        depth: ``6n + 2`` (20, 32, 44, 56, 110, ...).
        width: channel multiplier applied to the 16/32/64 stage widths.
        zero_init_residual: start every block's last BN with zero scale, so each block begins as the
            identity (Goyal et al. 2017).

    Example:
        >>> net = CifarResNet(20, width=0.5)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 32])
    """

    def __init__(self, depth: int, width: float = 1.0, zero_init_residual: bool = False) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        blocks = (depth - 2) // 6
        widths = [_scaled(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages = []
        in_channels = widths[0]
        for i, out_channels in enumerate(widths):
            stage = []
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                stage.append(BasicBlock(in_channels, out_channels, stride))
                in_channels = out_channels
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = widths[-1]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)


def cifar_resnet(depth: int, width: float = 1.0, zero_init_residual: bool = False) -> CifarResNet:
    """Build a :class:`CifarResNet` of the given depth (20, 32, 56, ...)."""
    return CifarResNet(depth, width=width, zero_init_residual=zero_init_residual)
