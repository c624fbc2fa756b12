"""Projection and prediction heads: the Linear-BN-ReLU MLPs of SimCLR, MoCo v2, BYOL and SimSiam.

SimCLR (Chen et al. 2020) and MoCo v2 (Chen et al. 2020) use a 2-layer projector; BYOL (Grill et al.
2020) a 2-layer projector and predictor with BN in the hidden layer; SimSiam (Chen & He 2021) a 3-layer
projector with BN on its output and a 2-layer bottleneck predictor. All are :func:`build_mlp`.
"""

from __future__ import annotations

from torch import nn

__all__ = ["build_mlp"]


def build_mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int,
    hidden_bn: bool = True,
    last_bn: bool = False,
    last_bn_affine: bool = True,
    bias: bool = True,
) -> nn.Sequential:
    """Build ``(Linear -> BN -> ReLU) x (num_layers - 1) -> Linear [-> BN]``.

    A Linear that is followed by BatchNorm never has a bias: BN subtracts the batch mean, which cancels
    it (SimCLR's reference code does the same). ``bias`` sets the bias of the other Linears.

    Args:
        in_dim: input features.
        hidden_dim: width of the hidden layers.
        out_dim: output features.
        num_layers: number of Linear layers; 1 gives a single Linear (MoCo v1's fc).
        hidden_bn: BatchNorm after each hidden Linear.
        last_bn: BatchNorm after the last Linear (SimSiam's projector).
        last_bn_affine: whether that last BatchNorm has a learnable scale and shift (SimSiam: no).
        bias: bias of the Linears that are not followed by BatchNorm.

    Returns:
        an ``nn.Sequential`` of the layers above.

    Example:
        >>> mlp = build_mlp(512, 2048, 128, num_layers=2)
        >>> [type(m).__name__ for m in mlp]
        ['Linear', 'BatchNorm1d', 'ReLU', 'Linear']
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    widths = {"in_dim": in_dim, "out_dim": out_dim, **({"hidden_dim": hidden_dim} if num_layers > 1 else {})}
    for name, width in widths.items():
        if width < 1:
            raise ValueError(f"projection/prediction head {name} must be >= 1, got {width}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=bias and not hidden_bn))
        if hidden_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=bias and not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=last_bn_affine))
    return nn.Sequential(*layers)
