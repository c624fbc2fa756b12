"""InfoNCE with an explicit bank of negatives, as in MoCo.

He, Fan, Wu, Xie, Girshick, "Momentum Contrast for Unsupervised Visual Representation Learning",
CVPR 2020, equation (1); van den Oord et al. 2018 for InfoNCE.

For a query ``q`` with positive key ``k`` and negatives ``n_1..n_K`` the loss is
``-log( exp(q.k / tau) / (exp(q.k / tau) + sum_j exp(q.n_j / tau)) )``, i.e. a cross-entropy over
``1 + K`` logits with label 0, averaged over the batch. The negatives are given explicitly (a queue, a
learnable memory), so this loss does no communication between ranks.

With a :class:`~contrastlab.objectives.feature_transform.FeatureTransform` (Zhu et al., ICCV 2021) the
logits are computed from the transformed ``q', k'`` and negatives after L2 normalisation of ``q, k``;
the info dict then also holds the logits before the transform (``pos_logits_raw``, ``neg_logits_raw``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contrastlab.errors import ConfigError
from contrastlab.objectives.feature_transform import FeatureTransform

__all__ = ["InfoNCELoss"]


class InfoNCELoss(nn.Module):
    """InfoNCE of queries against their keys and a shared bank of negatives.

    Args:
        temperature: ``tau`` dividing the dot products (MoCo v1/v2: 0.07/0.2).
        feature_transform: optional FT hook applied to the normalised ``q, k`` and the negatives before
            the logits (the given negatives are not modified).

    The forward pass takes ``q [B, D]``, ``k [B, D]`` and ``negatives [K, D]``. ``q`` and ``k`` are
    L2-normalised inside; ``negatives`` are used as given (a :class:`~contrastlab.memory.FeatureQueue`
    holds unit vectors). Gradients flow into every argument; detach ``k`` yourself when it comes from a
    momentum encoder. Returns ``(loss, info)`` with, detached, ``logits [B, 1 + K]`` (column 0 is the
    positive), ``pos_logits [B]`` and ``neg_logits [B, K]``: the logits the loss saw. With a feature
    transform, also ``pos_logits_raw [B]`` and ``neg_logits_raw [B, K]`` from the untransformed features
    (equal to the others while the transform is inactive, before its start epoch).

    Example:
        >>> loss_fn = InfoNCELoss(temperature=0.2)
        >>> q, k = torch.randn(4, 16), torch.randn(4, 16)
        >>> bank = F.normalize(torch.randn(32, 16), dim=1)
        >>> loss, info = loss_fn(q, k, bank)
        >>> info["neg_logits"].shape
        torch.Size([4, 32])
    """

    def __init__(self, temperature: float = 0.2, feature_transform: FeatureTransform | None = None) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"InfoNCE temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.feature_transform = feature_transform

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if q.shape != k.shape or q.dim() != 2:
            raise ValueError(f"q and k must both be [B, D], got {tuple(q.shape)} and {tuple(k.shape)}")
        if negatives.dim() != 2 or negatives.shape[1] != q.shape[1]:
            raise ValueError(f"negatives must be [K, {q.shape[1]}], got {tuple(negatives.shape)}")
        q = F.normalize(q, dim=1)
        k = F.normalize(k, dim=1)
        ft = self.feature_transform
        transformed = ft is not None and ft.active
        if transformed:
            raw_q, raw_k, raw_negatives = q, k, negatives
            q, k, negatives = ft(q, k, negatives.to(q.dtype))[:3]
        logits = self._logits(q, k, negatives)
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        loss = F.cross_entropy(logits, labels)
        detached = logits.detach()
        info = {"logits": detached, "pos_logits": detached[:, 0], "neg_logits": detached[:, 1:]}
        if ft is not None:
            if transformed:
                with torch.no_grad():
                    raw = self._logits(raw_q, raw_k, raw_negatives)
            else:
                raw = detached
            info["pos_logits_raw"], info["neg_logits_raw"] = raw[:, 0], raw[:, 1:]
        return loss, info

    def _logits(self, q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + K]`` logits, column 0 the positive."""
        pos = (q * k).sum(dim=1, keepdim=True)  # [B, 1]
        neg = q @ negatives.to(q.dtype).T  # [B, K]
        similarity = torch.cat([pos, neg], dim=1)
        # Softmax in at least float32 (bf16/fp16 similarities under autocast lose too much).
        return similarity.to(torch.promote_types(similarity.dtype, torch.float32)) / self.temperature
