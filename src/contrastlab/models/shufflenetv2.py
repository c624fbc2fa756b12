"""ShuffleNetV2 for CIFAR (0.5x and 1x).

Ma, Zhang, Zheng, Sun, "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design",
ECCV 2018. Each stage is one down-sampling unit (two stride-2 branches, concatenated) followed by basic
units (channel split in halves, one half through 1x1 - depthwise 3x3 - 1x1, concatenation, channel
shuffle with 2 groups); a 1x1 convolution to 1024 channels (the paper's Conv5) ends the network.

The CIFAR variant is the one Mutual Contrastive Learning ships (Yang et al., AAAI 2022;
github.com/winycg/MCL): a 3x3 stem with 24 channels at stride 1 and no max-pool, three
stages of a down-sampling unit and 3, 7 and 3 basic units, stage widths 48/96/192 (0.5x) or 116/232/464
(1x), Conv5 to 1024, global average pooling (upstream pools a 4x4 map with ``avg_pool2d(4)``, the same
on 32x32 inputs). PyTorch's default initialisation, as upstream.

Stages (:mod:`contrastlab.models.staged`): ``stem`` (conv1, bn1, relu), ``layer1``, ``layer2``,
``layer3``, ``conv5`` (1x1 conv, BN, ReLU; upstream's ``conv2``/``bn2``), ``pool``; upstream MCL shares
``stem`` and ``layer1``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from contrastlab.models.staged import FLATTEN, StageSpec

__all__ = ["SHUFFLENETV2_WIDTHS", "ShuffleNetV2", "channel_shuffle", "shufflenetv2"]

SHUFFLENETV2_WIDTHS: dict[float, tuple[int, int, int]] = {0.5: (48, 96, 192), 1.0: (116, 232, 464)}
"""Width multiplier -> output channels of the three stages (Ma et al., Table 5)."""

_UNITS_PER_STAGE = (3, 7, 3)  # basic units after the down-sampling unit of each stage
_CONV5_CHANNELS = 1024


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, C, H, W]``: view the channels as ``[groups, C / groups]``, transpose, flatten back."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, depthwise: bool = False,
             relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                  groups=in_channels if depthwise else 1, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicUnit(nn.Module):
    """Split the channels; the second half goes through 1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN-ReLU;
    concatenate; shuffle.

    Args:
        channels: input and output channels (even).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            _conv_bn(half, half, 1),
            _conv_bn(half, half, 3, depthwise=True, relu=False),
            _conv_bn(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, transform = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([keep, self.branch(transform)], dim=1), 2)


class DownUnit(nn.Module):
    """Two stride-2 branches, each producing half the output channels; concat; shuffle.

    Left: depthwise 3x3/2-BN, 1x1-BN-ReLU. Right: 1x1-BN-ReLU, depthwise 3x3/2-BN, 1x1-BN-ReLU.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output (even).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        half = out_channels // 2
        self.left = nn.Sequential(
            _conv_bn(in_channels, in_channels, 3, stride=2, depthwise=True, relu=False),
            _conv_bn(in_channels, half, 1),
        )
        self.right = nn.Sequential(
            _conv_bn(in_channels, half, 1),
            _conv_bn(half, half, 3, stride=2, depthwise=True, relu=False),
            _conv_bn(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], dim=1), 2)


class ShuffleNetV2(nn.Module):
    """CIFAR ShuffleNetV2 feature extractor: ``[B, 3, H, W] -> [B, 1024]``.

    Args:
        width: 0.5 or 1.0 (see :data:`SHUFFLENETV2_WIDTHS`).

    Example:
        >>> net = ShuffleNetV2(0.5)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 1024])
    """

    stage_spec: ClassVar[StageSpec] = (
        ("stem", ("conv1", "bn1", "relu")),
        ("layer1", ("layer1",)),
        ("layer2", ("layer2",)),
        ("layer3", ("layer3",)),
        ("conv5", ("conv5", "bn5", "relu5")),
        ("pool", ("avgpool", FLATTEN)),
    )
    upstream_shared_until: ClassVar[str] = "layer1"

    def __init__(self, width: float) -> None:
        super().__init__()
        if width not in SHUFFLENETV2_WIDTHS:
            raise ValueError(f"ShuffleNetV2 width must be one of {sorted(SHUFFLENETV2_WIDTHS)}, got {width}")
        stem_channels = 24
        self.conv1 = nn.Conv2d(3, stem_channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        in_channels = stem_channels
        for out_channels, units in zip(SHUFFLENETV2_WIDTHS[width], _UNITS_PER_STAGE, strict=True):
            stage = [DownUnit(in_channels, out_channels)] + [BasicUnit(out_channels) for _ in range(units)]
            stages.append(nn.Sequential(*stage))
            in_channels = out_channels
        self.layer1, self.layer2, self.layer3 = stages
        self.conv5 = nn.Conv2d(in_channels, _CONV5_CHANNELS, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(_CONV5_CHANNELS)
        self.relu5 = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = _CONV5_CHANNELS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu5(self.bn5(self.conv5(x)))
        return torch.flatten(self.avgpool(x), 1)


def shufflenetv2(width: float) -> ShuffleNetV2:
    """Build a CIFAR :class:`ShuffleNetV2` of width 0.5 or 1.0."""
    return ShuffleNetV2(width)
