"""The Barlow Twins loss: push the cross-correlation of two views' standardised embeddings to the identity.

Zbontar, Jing, Misra, LeCun, Deny, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction", ICML 2021,
equations (1) and (2); released code facebookresearch/barlowtwins, ``main.py`` (``BarlowTwins.forward``).

Each view's embeddings ``z [N, D]`` are standardised per dimension over the batch, as a ``BatchNorm1d`` without
affine parameters does in training mode (mean and biased variance of the batch, ``eps`` added to the variance).
The cross-correlation is ``C = a^T b / N`` for the standardised views ``a`` and ``b``, and the loss

    L = scale * ( sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2 )

(invariance term, then redundancy reduction term). ``C(b, a) = C(a, b)^T``, so swapping the views leaves the loss
unchanged; permuting the images of the batch (the same permutation for both views) leaves ``C`` unchanged.

**The global batch.** With ``gather_distributed=True`` under DDP, the batch statistics and ``C`` are those of the
global batch: the per-rank sums behind the mean, the variance and ``C`` are summed over ranks by
:func:`~contrastlab.engine.distributed.all_reduce_with_grad`, whose backward sums the gradient over ranks, so that
after DDP's averaging the gradient is exactly that of a single process on the global batch. The release reaches the
same forward values (SyncBatchNorm for the statistics, ``torch.distributed.all_reduce(c)`` after dividing by the
global batch), but its all-reduce has no backward: each rank back-propagates only its own share of ``C`` and DDP
then averages, so its gradient is the single-process gradient divided by the number of GPUs. ``scale = 1 / W``
reproduces a release run on ``W`` GPUs (``docs/barlow_twins.md``).

**Precision.** ``C`` and the loss are computed in at least float32 with autocast switched off (an entry near 1 keeps
about three significant digits in bfloat16, where the invariance term lives).

``scale`` is solo-learn's ``scale_loss`` (vturrisi/solo-learn, ``solo/losses/barlow.py``; 0.1 in its CIFAR
recipes); the release uses 1.
"""

from __future__ import annotations

import torch
from torch import nn

from contrastlab.engine.distributed import all_reduce_with_grad, get_world_size
from contrastlab.errors import ConfigError

__all__ = ["BarlowTwinsLoss", "cross_correlation"]


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-5,
                      gather_distributed: bool = False) -> torch.Tensor:
    """``C [D, D]`` of two views' embeddings ``[N, D]``, each standardised over the (global) batch.

    Computed in at least float32, with autocast off. With ``gather_distributed`` and more than one rank, the
    statistics and the sum over images run over every rank's images (module docstring).

    Example:
        >>> c = cross_correlation(torch.randn(8, 4), torch.randn(8, 4))
        >>> c.shape
        torch.Size([4, 4])
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be [N, D], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    distributed = gather_distributed and get_world_size() > 1
    reduce = all_reduce_with_grad if distributed else (lambda t: t)
    dtype = torch.promote_types(torch.promote_types(z1.dtype, z2.dtype), torch.float32)
    with torch.autocast(device_type=z1.device.type, enabled=False):
        z = torch.stack([z1.to(dtype), z2.to(dtype)])  # [2, N, D]: the two views, standardised separately
        count = z.new_full((1,), float(z.shape[1]))
        sums = reduce(torch.cat([z.sum(dim=1).flatten(), count]))
        n = sums[-1]
        centred = z - (sums[:-1] / n).view(2, 1, -1)
        var = reduce(centred.pow(2).sum(dim=1)) / n  # biased, as BatchNorm normalises
        a, b = centred / torch.sqrt(var + eps).unsqueeze(1)
        return reduce(a.T @ b / n)


class BarlowTwinsLoss(nn.Module):
    """The Barlow Twins loss of two views' embeddings, optionally over the global batch.

    Args:
        lambd: weight of the off-diagonal (redundancy reduction) term; the release's ``--lambd`` (0.0051).
        scale: factor on the whole loss (solo-learn's ``scale_loss``).
        eps: added to the batch variance before standardising (``BatchNorm1d``'s default).
        gather_distributed: statistics and ``C`` over every rank's images.

    The forward pass takes ``z1, z2`` of shape ``[N, D]`` and returns ``(loss, info)``; ``info`` holds the two
    terms, detached and scaled as in the loss (they sum to it): ``on_diagonal`` (``scale * sum_i (1 - C_ii)^2``)
    and ``off_diagonal`` (``scale * lambd * sum_{i != j} C_ij^2``).

    Example:
        >>> loss_fn = BarlowTwinsLoss(lambd=0.0051)
        >>> loss, info = loss_fn(torch.randn(8, 16), torch.randn(8, 16))
        >>> sorted(info)
        ['off_diagonal', 'on_diagonal']
    """

    def __init__(self, lambd: float = 0.0051, scale: float = 1.0, eps: float = 1e-5,
                 gather_distributed: bool = False) -> None:
        super().__init__()
        if not lambd >= 0:
            raise ConfigError(f"method.lambd (the off-diagonal weight) must be >= 0, got {lambd}")
        if not scale > 0:
            raise ConfigError(f"method.scale_loss must be positive, got {scale}; 1 is the release's loss")
        if not eps > 0:
            raise ConfigError(f"the Barlow Twins standardisation's eps must be positive, got {eps}")
        self.lambd = lambd
        self.scale = scale
        self.eps = eps
        self.gather_distributed = gather_distributed

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = cross_correlation(z1, z2, self.eps, self.gather_distributed)
        diagonal = torch.diagonal(c)
        on_diagonal = self.scale * (1 - diagonal).pow(2).sum()
        off_diagonal = self.scale * self.lambd * (c.pow(2).sum() - diagonal.pow(2).sum())
        return on_diagonal + off_diagonal, {"on_diagonal": on_diagonal.detach(),
                                            "off_diagonal": off_diagonal.detach()}
