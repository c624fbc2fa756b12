"""DINO's projection head: an MLP to a bottleneck, L2 normalisation, then a weight-normalised last layer.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021 (section 3.1, "the projection
head consists of a 3-layer multi-layer perceptron (MLP) with hidden dimension 2048 followed by l2 normalization and a
weight normalized fully connected layer with K dimensions"); released as ``DINOHead`` in ``vision_transformer.py``
of github.com/facebookresearch/dino.

What the released head does beyond the paper's sentence:

- GELU activations; no BatchNorm unless ``use_bn`` (upstream ``--use_bn_in_head``), and with it the Linear before
  each BN keeps its bias (so it is not :func:`contrastlab.models.heads.build_mlp`, whose Linears before a BN have
  none, and the released checkpoints' keys load as they are);
- the MLP's Linears start from a truncated normal (std 0.02) with zero biases;
- the last layer is ``weight_norm(Linear(bottleneck, K, bias=False))`` (Salimans & Kingma 2016): ``W = g v / ||v||``
  row by row, ``v`` from PyTorch's default Linear initialisation and ``g`` filled with 1; with ``norm_last_layer``
  (the default) ``g`` never trains, so every row of ``W`` has norm 1 (a cosine classifier over ``K`` prototypes).

:class:`WeightNormLinear` keeps upstream's parameter names (``weight_g [K, 1]``, ``weight_v [K, bottleneck]``)
without ``torch.nn.utils.weight_norm`` (deprecated in recent PyTorch).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOHead", "WeightNormLinear"]


class WeightNormLinear(nn.Module):
    """A bias-free Linear ``y = x W^T`` with ``W = weight_g * weight_v / ||weight_v||`` (norm of each row).

    Args:
        in_dim: input features.
        out_dim: output features (rows of ``W``).
        fixed_norm: ``weight_g`` stays 1 and takes no gradient (DINO's ``norm_last_layer``).

    Example:
        >>> layer = WeightNormLinear(4, 3, fixed_norm=True)
        >>> [round(float(n), 5) for n in layer.weight.norm(dim=1)]
        [1.0, 1.0, 1.0]
    """

    def __init__(self, in_dim: int, out_dim: int, fixed_norm: bool = True) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default initialisation
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fixed_norm)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight ``[out_dim, in_dim]``."""
        return self.weight_v * (self.weight_g / torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """DINO's head: ``MLP -> L2 normalisation -> weight-normalised Linear`` (see the module docstring).

    Args:
        in_dim: the backbone's feature dimension.
        out_dim: ``K``, the output dimension (upstream ``--out_dim``, 65536).
        hidden_dim: width of the MLP's hidden layers (2048).
        bottleneck_dim: the MLP's output, L2-normalised (256).
        num_layers: Linears in the MLP (3); 1 is a single ``Linear(in_dim, bottleneck_dim)``.
        use_bn: BatchNorm after each hidden Linear (upstream ``--use_bn_in_head``, off by default).
        norm_last_layer: keep the last layer's row norms at 1 (upstream ``--norm_last_layer``, on by default).

    Attributes:
        mlp: the MLP (``nn.Sequential``, or an ``nn.Linear`` when ``num_layers == 1``).
        last_layer: the :class:`WeightNormLinear` ``bottleneck_dim -> out_dim``.

    Example:
        >>> head = DINOHead(384, out_dim=1000, hidden_dim=64, bottleneck_dim=16)
        >>> head(torch.randn(2, 384)).shape
        torch.Size([2, 1000])
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        widths = {"in_dim": in_dim, "out_dim": out_dim, "bottleneck_dim": bottleneck_dim,
                  **({"hidden_dim": hidden_dim} if num_layers > 1 else {})}
        for name, width in widths.items():
            if width < 1:
                raise ValueError(f"DINO head {name} must be >= 1, got {width}")
        self.mlp: nn.Module
        if num_layers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            dim = in_dim
            for _ in range(num_layers - 1):
                layers.append(nn.Linear(dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
                dim = hidden_dim
            layers.append(nn.Linear(dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_norm=norm_last_layer)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP's output, before normalisation: ``[B, bottleneck_dim]``."""
        return self.mlp(x)

    def prototypes(self, z: torch.Tensor) -> torch.Tensor:
        """The last layer on the L2-normalised bottleneck ``z``: ``[B, out_dim]``."""
        return self.last_layer(F.normalize(z, dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prototypes(self.project(x))
