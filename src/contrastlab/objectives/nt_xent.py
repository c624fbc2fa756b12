"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR.

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020, equation (1).

Every embedding of a two-view batch is an anchor. Its positive is the other view of the same image; its
negatives are the ``2N - 2`` other embeddings of the (global) batch of ``N`` images. With
``gather_distributed=True`` the candidates come from every rank through
:func:`~contrastlab.engine.distributed.gather_with_grad` and each rank computes the loss of its own
``2B`` anchors, averaged over them. Under DDP, which averages gradients over ranks, that gives exactly
the gradient of the single-process loss on the global batch (see ``tests/test_distributed.py``).

**Feature Transformation** (Zhu et al., ICCV 2021; :mod:`contrastlab.objectives.feature_transform`),
which upstream only ran on MoCo, maps onto the batch as follows: the pair of image ``i`` is
``(q, k) = (z1_i, z2_i)`` (normalised), extrapolated with the pair's coefficient; each anchor (``z1'_i``,
then ``z2'_i``) is scored against its extrapolated partner; its negatives are the ``2N - 2`` other
*untransformed* normalised embeddings of the (gathered) batch, each interpolated with a random partner
drawn from all ``2N`` candidates (the partner may be the anchor or its positive). This mirrors MoCo,
where the extrapolated query meets negatives that are raw keys of other images. The info dict then also
holds ``pos_logits_raw`` and ``neg_logits_raw``, the logits without the transform.

**Loss scale.** ContrastiveCrop's SimCLR (``losses/NT_Xent_dist.py``, from SupContrast) multiplies the loss
by ``temperature / base_temperature`` (0.5 / 0.07, about 7.1), which with SGD amounts to a larger learning
rate relative to weight decay; its published small-dataset numbers were trained with it. ``base_temperature``
reproduces it; ``None`` (the default) is the plain NT-Xent of the SimCLR paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contrastlab.engine.distributed import gather_with_grad, get_rank, get_world_size
from contrastlab.errors import ConfigError
from contrastlab.objectives.feature_transform import FeatureTransform

__all__ = ["NTXentLoss"]


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent loss over two views, optionally with negatives from every rank.

    Args:
        temperature: ``tau`` dividing the cosine similarities.
        gather_distributed: gather the embeddings of all ranks (with gradient) as candidates.
        feature_transform: optional FT hook (see the module docstring for how it maps onto the batch).
        base_temperature: when set, the loss is multiplied by ``temperature / base_temperature``
            (ContrastiveCrop's SimCLR scaling; module docstring).

    The forward pass takes ``z1, z2`` of shape ``[B, D]`` (any scale; L2-normalised inside) and returns
    ``(loss, info)``. The anchors of this rank are ``[z1; z2]`` (``2B`` rows, in that order) and
    ``info`` holds, detached and aligned row by row with those anchors:

    - ``pos_logits`` ``[2B]``: ``cos(anchor, positive) / tau``;
    - ``neg_logits`` ``[2B, 2N - 2]``: ``cos(anchor, negative) / tau`` for the ``2N - 2`` negatives of
      the global batch (``N = B * world_size``), in gathered order with the anchor and its positive removed;
    - with a feature transform, ``pos_logits_raw`` and ``neg_logits_raw``: the same without the transform
      (``pos_logits``/``neg_logits`` are then what the loss saw).

    Example:
        >>> loss_fn = NTXentLoss(temperature=0.5)
        >>> z1, z2 = torch.randn(8, 128), torch.randn(8, 128)
        >>> loss, info = loss_fn(z1, z2)
        >>> info["neg_logits"].shape
        torch.Size([16, 14])
    """

    def __init__(
        self, temperature: float = 0.5, gather_distributed: bool = False,
        feature_transform: FeatureTransform | None = None, base_temperature: float | None = None,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"NT-Xent temperature must be positive, got {temperature}")
        if base_temperature is not None and base_temperature <= 0:
            raise ConfigError(f"method.base_temperature must be positive (or null), got {base_temperature}")
        self.temperature = temperature
        self.loss_scale = 1.0 if base_temperature is None else temperature / base_temperature
        self.gather_distributed = gather_distributed
        self.feature_transform = feature_transform

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
        ft = self.feature_transform
        if ft is not None and ft.active:
            return self._transformed(local, candidates, offset, ft)
        similarity = local @ candidates.T  # [2B, 2N]
        # Softmax in at least float32 (bf16/fp16 similarities under autocast lose too much).
        logits = similarity.to(torch.promote_types(similarity.dtype, torch.float32)) / self.temperature
        rows = torch.arange(2 * batch, device=logits.device)
        self_idx = rows + offset
        pos_idx = (rows + batch) % (2 * batch) + offset
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        self_mask[rows, self_idx] = True
        loss = self.loss_scale * F.cross_entropy(logits.masked_fill(self_mask, float("-inf")), pos_idx)

        with torch.no_grad():
            detached = logits.detach()
            pos_logits = detached[rows, pos_idx]
            neg_mask = ~self_mask
            neg_mask[rows, pos_idx] = False
            neg_logits = detached[neg_mask].view(2 * batch, -1)
        info = {"pos_logits": pos_logits, "neg_logits": neg_logits}
        if ft is not None:  # inactive (before its start epoch): the raw logits are the logits
            info["pos_logits_raw"], info["neg_logits_raw"] = pos_logits, neg_logits
        return loss, info

    def _negative_mask(self, rows: int, columns: int, offset: int, device: torch.device) -> torch.Tensor:
        """``[2B, 2N]`` boolean mask of each anchor's negatives (itself and its positive excluded)."""
        batch = rows // 2
        index = torch.arange(rows, device=device)
        mask = torch.ones(rows, columns, dtype=torch.bool, device=device)
        mask[index, index + offset] = False
        mask[index, (index + batch) % rows + offset] = False
        return mask

    def _transformed(
        self, local: torch.Tensor, candidates: torch.Tensor, offset: int, ft: FeatureTransform
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss on feature-transformed embeddings (module docstring), with the raw logits in the info."""
        rows = local.shape[0]
        batch = rows // 2
        q, k, negatives = ft(local[:batch], local[batch:], candidates)[:3]
        anchors = torch.cat([q, k], dim=0)  # [2B, D]: extrapolated view 1, then view 2
        pos = (q * k).sum(dim=1).repeat(2)  # anchor i and anchor B + i share their pair's score
        neg_mask = self._negative_mask(rows, candidates.shape[0], offset, local.device)
        neg = (anchors @ negatives.T)[neg_mask].view(rows, -1)  # [2B, 2N - 2]
        similarity = torch.cat([pos[:, None], neg], dim=1)
        logits = similarity.to(torch.promote_types(similarity.dtype, torch.float32)) / self.temperature
        loss = self.loss_scale * F.cross_entropy(logits, torch.zeros(rows, dtype=torch.long, device=local.device))
        with torch.no_grad():
            detached = logits.detach()
            raw = (local @ candidates.T).to(logits.dtype) / self.temperature
            index = torch.arange(rows, device=local.device)
            pos_raw = raw[index, (index + batch) % rows + offset]
            neg_raw = raw[neg_mask].view(rows, -1)
        return loss, {"pos_logits": detached[:, 0], "neg_logits": detached[:, 1:],
                      "pos_logits_raw": pos_raw, "neg_logits_raw": neg_raw}
