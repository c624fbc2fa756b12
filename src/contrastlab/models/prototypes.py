"""SwAV's prototypes: a bias-free linear layer whose rows are put back on the unit sphere before every step.

Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments", NeurIPS 2020
(section 3.1: the prototypes ``C`` are trainable vectors; appendix A.1: they are projected to the unit sphere).
The release (facebookresearch/swav, ``src/resnet50.py`` and ``main_swav.py``) holds them in
``nn.Linear(feat_dim, nmb_prototypes, bias=False)`` named ``prototypes`` and, at the start of every iteration,
replaces the weight by its row-wise L2 normalisation under ``torch.no_grad()``; the gradient step then moves the
rows off the sphere until the next iteration. :class:`Prototypes` keeps that layout (``prototypes.weight``) and
offers the normalisation as :meth:`Prototypes.normalize_`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Prototypes"]


class Prototypes(nn.Linear):
    """``K`` prototype vectors of dimension ``D``: ``forward(z) = z @ weight.T`` (``[B, D] -> [B, K]``).

    Args:
        dim: embedding dimension ``D``.
        num_prototypes: ``K`` (3000 for ImageNet).

    Example:
        >>> protos = Prototypes(8, 5)
        >>> protos.normalize_()
        >>> torch.allclose(protos.weight.norm(dim=1), torch.ones(5))
        True
    """

    def __init__(self, dim: int, num_prototypes: int) -> None:
        if dim < 1 or num_prototypes < 1:
            raise ValueError(f"prototypes need a positive dimension and count, got dim={dim}, "
                             f"num_prototypes={num_prototypes}")
        super().__init__(dim, num_prototypes, bias=False)

    @torch.no_grad()
    def normalize_(self) -> None:
        """Put every prototype (row of ``weight``) on the unit sphere, in place and outside autograd."""
        self.weight.copy_(F.normalize(self.weight, dim=1, p=2))
