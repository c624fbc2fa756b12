"""HCGNet for CIFAR (HCGNet-A1 and HCGNet-A2).

Yang, Xu, Zhang, Zhao, An, "Gated Convolutional Networks with Hybrid Connectivity for Image
Classification", AAAI 2020 (upstream: winycg/HCGNet). A DenseNet-like network of three *hybrid blocks*
joined by two *transitions*. Each hybrid block stacks SMG modules; an SMG module squeezes its input
(BN-ReLU-1x1 conv to ``4 * growth`` channels, BN-ReLU-grouped 3x3 conv to ``growth`` channels), gates
the result, and concatenates it to its input (dense connectivity, so a block adds ``growth`` channels
per module). The gate (:class:`GatedCell`) combines

- a forget gate on the squeezed features: attention-weighted global pooling, 1x1 conv, BN, tanh,
  1x1 conv, sigmoid, one weight per channel (the residual, "update" path);
- a multi-scale context: a depthwise 3x3 and a depthwise dilated 3x3 (5x5 receptive field) conv, each
  attention-pooled to one vector, fused by a softmax over the two scales per channel, and added to
  every position.

A transition compresses the channels by ``theta = 0.5`` (BN-ReLU-1x1 conv, BN-ReLU-3x3 conv with
stride 2) and applies the same gate. After the last block come BN, ReLU and global average pooling.

HCGNet-A1: growth rates (12, 24, 36), 8 SMG modules per block, 414-d features, about 1.1M parameters
with a 100-class fc; HCGNet-A2: growth rates (24, 36, 64), 716-d features, about 3.1M (upstream
README). These are the HCGNets of Mutual Contrastive Learning (Yang et al., AAAI 2022;
github.com/winycg/MCL). PyTorch's default initialisation, as upstream.

The gates normalise pooled vectors with ``BatchNorm1d``, so training needs more than one image per batch.

Stages (:mod:`contrastlab.models.staged`): ``stem`` (conv0), ``block1``, ``trans1``, ``block2``,
``trans2``, ``block3``, ``norm`` (norm5 and ReLU), ``pool``; upstream MCL shares ``stem``, ``block1``
and ``trans1``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from contrastlab.models.staged import FLATTEN, StageSpec

__all__ = ["HCGNET_CONFIGS", "HCGNet", "hcgnet"]

HCGNET_CONFIGS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "a1": ((12, 24, 36), (8, 8, 8)),
    "a2": ((24, 36, 64), (8, 8, 8)),
}
"""Variant -> (growth rate per block, SMG modules per block) (Yang et al. 2020, Table 1)."""


def _bn_relu_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                  dilation: int = 1) -> nn.Sequential:
    """Pre-activation convolution: BN, ReLU, conv (no bias); 'same' padding for odd kernels."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups,
                  dilation=dilation, bias=False),
    )


def _attention_pool(x: torch.Tensor, scorer: nn.Module) -> torch.Tensor:
    """Attention pooling ``sum_p softmax_p(scorer(x)) * x[:, :, p]``: ``[B, C, H, W] -> [B, C, 1, 1]``."""
    b, _, h, w = x.shape
    weights = F.softmax(scorer(x).flatten(1), dim=1).view(b, 1, h, w)
    return (x * weights).sum(dim=(2, 3), keepdim=True)


class GatedCell(nn.Module):
    """The gate shared by SMG modules and transitions: ``x * forget(x) + multi_scale_context(x)``.

    Args:
        channels: channels of the input and output.
        reduction: channel reduction of the scale-fusion bottleneck (``2C / reduction`` channels).
        forget: channel reduction of the forget gate's bottleneck (``C / forget`` channels).
    """

    def __init__(self, channels: int, reduction: int, forget: int) -> None:
        super().__init__()
        # Forget gate.
        self.forget_context = nn.Conv2d(channels, 1, 1)
        self.forget_fc1 = nn.Conv2d(channels, channels // forget, 1)
        self.forget_bn = nn.BatchNorm1d(channels // forget)
        self.forget_fc2 = nn.Conv2d(channels // forget, channels, 1)
        # Multi-scale context: depthwise 3x3 and dilated depthwise 3x3, fused per channel.
        self.conv_3x3 = _bn_relu_conv(channels, channels, 3, groups=channels)
        self.conv_5x5 = _bn_relu_conv(channels, channels, 3, groups=channels, dilation=2)
        self.context_3x3 = nn.Conv2d(channels, 1, 1)
        self.context_5x5 = nn.Conv2d(channels, 1, 1)
        hidden = 2 * channels // reduction
        self.fuse_fc = nn.Conv2d(2 * channels, hidden, 1)
        self.fuse_bn = nn.BatchNorm1d(hidden)
        self.fc_3x3 = nn.Conv2d(hidden, channels, 1)
        self.fc_5x5 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        pooled = _attention_pool(x, self.forget_context)
        hidden = torch.tanh(self.forget_bn(self.forget_fc1(pooled).flatten(1)))
        keep = torch.sigmoid(self.forget_fc2(hidden[:, :, None, None]))

        small = _attention_pool(self.conv_3x3(x), self.context_3x3)
        large = _attention_pool(self.conv_5x5(x), self.context_5x5)
        hidden = torch.tanh(self.fuse_bn(self.fuse_fc(torch.cat([small, large], dim=1)).flatten(1)))
        hidden = hidden[:, :, None, None]
        scores = torch.stack([self.fc_3x3(hidden).flatten(1), self.fc_5x5(hidden).flatten(1)], dim=1)
        weights = F.softmax(scores, dim=1)  # [B, 2, C]: softmax over the two scales
        context = weights[:, 0].view(b, c, 1, 1) * small + weights[:, 1].view(b, c, 1, 1) * large
        return x * keep + context


class SMG(nn.Module):
    """Squeeze (1x1 to ``bottleneck * growth``, grouped 3x3 to ``growth``), gate, concatenate to the input.

    Args:
        in_channels: channels of the input; the output has ``in_channels + growth``.
        growth: channels added by the module.
        bottleneck: width of the 1x1 squeeze as a multiple of ``growth``.
        groups: groups of the 3x3 convolution.
    """

    def __init__(self, in_channels: int, growth: int, bottleneck: int = 4, groups: int = 4) -> None:
        super().__init__()
        self.squeeze = nn.Sequential(
            _bn_relu_conv(in_channels, bottleneck * growth, 1),
            _bn_relu_conv(bottleneck * growth, growth, 3, groups=groups),
        )
        self.gate = GatedCell(growth, reduction=2, forget=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.gate(self.squeeze(x))], dim=1)


class Transition(nn.Module):
    """Compress ``in_channels`` to ``out_channels`` at half the resolution, then gate.

    BN-ReLU-1x1 conv to ``in - (in - out) // 2`` channels, BN-ReLU-3x3 conv with stride 2 to ``out``.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid_channels = in_channels - (in_channels - out_channels) // 2
        self.compress = nn.Sequential(
            _bn_relu_conv(in_channels, mid_channels, 1),
            _bn_relu_conv(mid_channels, out_channels, 3, stride=2),
        )
        self.gate = GatedCell(out_channels, reduction=4, forget=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.compress(x))


class HCGNet(nn.Module):
    """HCGNet feature extractor: ``[B, 3, H, W] -> [B, num_features]``.

    Args:
        growth: growth rate of each hybrid block.
        modules_per_block: SMG modules in each hybrid block.
        theta: compression of the transitions.

    Example:
        >>> net = HCGNet(growth=(4, 4, 4), modules_per_block=(1, 1, 1))
        >>> net.num_features  # 8 + 4 -> 6, 6 + 4 -> 5, 5 + 4
        9
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 9])
    """

    stage_spec: ClassVar[StageSpec] = (
        ("stem", ("conv0",)),
        ("block1", ("block1",)),
        ("trans1", ("trans1",)),
        ("block2", ("block2",)),
        ("trans2", ("trans2",)),
        ("block3", ("block3",)),
        ("norm", ("norm5", "relu")),
        ("pool", ("avgpool", FLATTEN)),
    )
    upstream_shared_until: ClassVar[str] = "trans1"

    def __init__(
        self,
        growth: tuple[int, int, int] = (12, 24, 36),
        modules_per_block: tuple[int, int, int] = (8, 8, 8),
        theta: float = 0.5,
    ) -> None:
        super().__init__()
        if len(growth) != 3 or len(modules_per_block) != 3:
            raise ValueError(f"HCGNet has three hybrid blocks, got growth={growth}, "
                             f"modules_per_block={modules_per_block}")
        channels = 2 * growth[0]
        self.conv0 = nn.Conv2d(3, channels, 3, stride=1, padding=1, bias=False)
        blocks: list[nn.Module] = []
        transitions: list[nn.Module] = []
        for i, (g, count) in enumerate(zip(growth, modules_per_block, strict=True)):
            blocks.append(nn.Sequential(*(SMG(channels + g * j, g) for j in range(count))))
            channels += g * count
            if i < 2:
                compressed = int(channels * theta)
                transitions.append(Transition(channels, compressed))
                channels = compressed
        self.block1, self.block2, self.block3 = blocks
        self.trans1, self.trans2 = transitions
        self.norm5 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trans1(self.block1(self.conv0(x)))
        x = self.block3(self.trans2(self.block2(x)))
        x = self.relu(self.norm5(x))
        return torch.flatten(self.avgpool(x), 1)


def hcgnet(variant: str) -> HCGNet:
    """Build HCGNet-A1 (``"a1"``) or HCGNet-A2 (``"a2"``)."""
    if variant not in HCGNET_CONFIGS:
        raise ValueError(f"HCGNet variant must be one of {sorted(HCGNET_CONFIGS)}, got {variant!r}")
    growth, modules_per_block = HCGNET_CONFIGS[variant]
    return HCGNet(growth, modules_per_block)
