"""CIFAR ResNets of He et al. 2016 (ResNet-20/32/56/110), with a width multiplier.

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2: a 3x3 stem
with 16 channels, three stages of ``n`` BasicBlocks with 16, 32 and 64 channels (the first block of
stages 2 and 3 halves the resolution), global average pooling; depth ``6n + 2``.

Where a block changes shape the shortcut is a 1x1 convolution followed by BatchNorm (the paper's
option B), not the zero-padded identity (option A). This matches the CIFAR ResNets that MCL ships
(github.com/winycg/MCL).

``bottleneck=True`` stacks :class:`Bottleneck` blocks (1x1, 3x3, 1x1 with expansion 4; He et al.,
section 4.1) instead, depth ``9n + 2``. Mutual Contrastive Learning's "ResNet-110" (Yang et al.,
AAAI 2022; github.com/winycg/MCL) is this network with ``n = 12``: widths 16/32/64 expanded to a 256-d
output, 1.17M parameters with a 100-class fc. It is not the BasicBlock ResNet-110 of He et al.
(``6n + 2`` with ``n = 18``, 64-d output), which ``bottleneck=False`` builds.

Stages (:mod:`contrastlab.models.staged`): ``stem`` (conv1, bn1, relu), ``layer1``, ``layer2``,
``layer3``, ``pool``; upstream MCL shares ``stem`` and ``layer1`` in its 4-peer cohorts.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from contrastlab.models.init import kaiming_init_
from contrastlab.models.staged import FLATTEN, StageSpec

__all__ = ["BasicBlock", "Bottleneck", "CifarResNet", "cifar_resnet"]


def _scaled(channels: int, width: float) -> int:
    """Channels after applying the width multiplier (at least one)."""
    return max(1, round(channels * width))


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity, or a 1x1 convolution and BN where the block changes the shape (option B)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (projection shortcut when the shape changes).

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        stride: stride of the first convolution (and of the shortcut).
    """

    expansion: ClassVar[int] = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, each with BN, plus a residual connection.

    He et al. 2016, section 4.1; the stride sits on the 3x3 convolution, as in torchvision and MCL.

    Args:
        in_channels: channels of the input.
        planes: channels of the inner 1x1 and 3x3 convolutions; the output has ``4 * planes``.
        stride: stride of the 3x3 convolution (and of the shortcut).
    """

    expansion: ClassVar[int] = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet feature extractor: ``[B, 3, H, W] -> [B, 64 * width * expansion]``.

    Args:
        depth: ``6n + 2`` with BasicBlocks (20, 32, 44, 56, 110, ...), ``9n + 2`` with Bottlenecks
            (MCL's ResNet-110: ``n = 12``).
        width: channel multiplier applied to the 16/32/64 stage widths.
        zero_init_residual: start every block's last BN with zero scale, so each block begins as the
            identity (Goyal et al. 2017).
        bottleneck: :class:`Bottleneck` blocks (expansion 4) instead of :class:`BasicBlock`.

    Example:
        >>> net = CifarResNet(20, width=0.5)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 32])
    """

    stage_spec: ClassVar[StageSpec] = (
        ("stem", ("conv1", "bn1", "relu")),
        ("layer1", ("layer1",)),
        ("layer2", ("layer2",)),
        ("layer3", ("layer3",)),
        ("pool", ("avgpool", FLATTEN)),
    )
    upstream_shared_until: ClassVar[str] = "layer1"

    def __init__(
        self, depth: int, width: float = 1.0, zero_init_residual: bool = False, bottleneck: bool = False
    ) -> None:
        super().__init__()
        layers_per_block = 3 if bottleneck else 2
        step = 3 * layers_per_block
        if depth < step + 2 or (depth - 2) % step != 0:
            raise ValueError(
                f"CIFAR ResNet depth must be {step}n + 2 with n >= 1 "
                f"({'Bottleneck' if bottleneck else 'BasicBlock'}), got {depth}"
            )
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        block: type[BasicBlock | Bottleneck] = Bottleneck if bottleneck else BasicBlock
        blocks = (depth - 2) // step
        widths = [_scaled(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages = []
        in_channels = widths[0]
        for i, planes in enumerate(widths):
            stage = []
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                stage.append(block(in_channels, planes, stride))
                in_channels = planes * block.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_channels

        kaiming_init_(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)
                elif isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)


def cifar_resnet(
    depth: int, width: float = 1.0, zero_init_residual: bool = False, bottleneck: bool = False
) -> CifarResNet:
    """Build a :class:`CifarResNet` of the given depth (20, 32, 56, 110, ...)."""
    return CifarResNet(depth, width=width, zero_init_residual=zero_init_residual, bottleneck=bottleneck)
