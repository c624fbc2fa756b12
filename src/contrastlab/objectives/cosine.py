"""Similarity losses without negatives: SimSiam's negative cosine and BYOL's normalised MSE.

- SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021, equation (1)):
  ``D(p, z) = -cos(p, z)``.
- BYOL (Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020, equation (2)):
  ``|| p / |p| - z / |z| ||^2 = 2 - 2 cos(p, z)``.

Both are averaged over the batch and computed in at least float32 (under bf16 autocast a cosine keeps
only about three significant digits). Neither applies the stop-gradient: the method decides which side
is the target and detaches it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BYOLLoss", "NegativeCosineSimilarity"]


def _at_least_float32(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors)


class NegativeCosineSimilarity(nn.Module):
    """SimSiam's ``D(p, z) = -cos(p, z)``, averaged over the batch.

    Example:
        >>> loss_fn = NegativeCosineSimilarity()
        >>> p, z = torch.randn(4, 8), torch.randn(4, 8)
        >>> loss = loss_fn(p, z.detach())
    """

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        p, z = _at_least_float32(p, z)
        return -F.cosine_similarity(p, z, dim=-1).mean()


class BYOLLoss(nn.Module):
    """BYOL's normalised mean squared error ``2 - 2 cos(p, z)``, averaged over the batch.

    Example:
        >>> loss_fn = BYOLLoss()
        >>> p, z = torch.randn(4, 8), torch.randn(4, 8)
        >>> loss = loss_fn(p, z.detach())
    """

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        p, z = _at_least_float32(p, z)
        p = F.normalize(p, dim=-1)
        z = F.normalize(z, dim=-1)
        return (p - z).pow(2).sum(dim=-1).mean()
