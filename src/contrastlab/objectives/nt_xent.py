"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR.

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020, equation (1).

Every embedding of a two-view batch is an anchor. Its positive is the other view of the same image; its
negatives are the ``2N - 2`` other embeddings of the (global) batch of ``N`` images. With
``gather_distributed=True`` the candidates come from every rank through
:func:`~contrastlab.engine.distributed.gather_with_grad` and each rank computes the loss of its own
``2B`` anchors, averaged over them. Under DDP, which averages gradients over ranks, that gives exactly
the gradient of the single-process loss on the global batch (see ``tests/test_distributed.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contrastlab.engine.distributed import gather_with_grad, get_rank, get_world_size
from contrastlab.errors import ConfigError

__all__ = ["NTXentLoss"]


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent loss over two views, optionally with negatives from every rank.

    Args:
        temperature: ``tau`` dividing the cosine similarities.
        gather_distributed: gather the embeddings of all ranks (with gradient) as candidates.

    The forward pass takes ``z1, z2`` of shape ``[B, D]`` (any scale; L2-normalised inside) and returns
    ``(loss, info)``. The anchors of this rank are ``[z1; z2]`` (``2B`` rows, in that order) and
    ``info`` holds, detached and aligned row by row with those anchors:

    - ``pos_logits`` ``[2B]``: ``cos(anchor, positive) / tau``;
    - ``neg_logits`` ``[2B, 2N - 2]``: ``cos(anchor, negative) / tau`` for the ``2N - 2`` negatives of
      the global batch (``N = B * world_size``), in gathered order with the anchor and its positive removed.

    Example:
        >>> loss_fn = NTXentLoss(temperature=0.5)
        >>> z1, z2 = torch.randn(8, 128), torch.randn(8, 128)
        >>> loss, info = loss_fn(z1, z2)
        >>> info["neg_logits"].shape
        torch.Size([16, 14])
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"NT-Xent temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if z1.shape != z2.shape or z1.dim() != 2:
            raise ValueError(f"z1 and z2 must both be [B, D], got {tuple(z1.shape)} and {tuple(z2.shape)}")
        batch = z1.shape[0]
        local = F.normalize(torch.cat([z1, z2], dim=0), dim=1)  # [2B, D]: rows 0..B-1 view 1, then view 2
        if self.gather_distributed and get_world_size() > 1:
            candidates = gather_with_grad(local)  # [2N, D], rank r's block at rows 2B*r .. 2B*(r+1)-1
            offset = 2 * batch * get_rank()
        else:
            candidates = local
            offset = 0
        similarity = local @ candidates.T  # [2B, 2N]
        # Softmax in at least float32 (bf16/fp16 similarities under autocast lose too much).
        logits = similarity.to(torch.promote_types(similarity.dtype, torch.float32)) / self.temperature
        rows = torch.arange(2 * batch, device=logits.device)
        self_idx = rows + offset
        pos_idx = (rows + batch) % (2 * batch) + offset
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        self_mask[rows, self_idx] = True
        loss = F.cross_entropy(logits.masked_fill(self_mask, float("-inf")), pos_idx)

        with torch.no_grad():
            detached = logits.detach()
            pos_logits = detached[rows, pos_idx]
            neg_mask = ~self_mask
            neg_mask[rows, pos_idx] = False
            neg_logits = detached[neg_mask].view(2 * batch, -1)
        return loss, {"pos_logits": pos_logits, "neg_logits": neg_logits}
