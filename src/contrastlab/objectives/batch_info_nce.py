"""In-batch InfoNCE against keys gathered from every rank: MoCo v3's loss.

Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021, algorithm 1:
the queries ``q [N, D]`` of this rank are contrasted against the keys ``k`` of the whole global batch
(``[world_size * N, D]``, gathered without gradient); query ``i`` of rank ``r`` has its positive at
global index ``r * N + i`` and every other key of the global batch as a negative. The cross-entropy is
scaled by ``2 * tau`` (the released code's choice: it makes the gradient scale independent of ``tau``).

Each rank averages over its own ``N`` queries; data-parallel gradient averaging then gives the mean over
the global batch, so ``n`` ranks with ``N`` images each train exactly as one process with ``n * N``.

**Feature Transformation** (Zhu et al., ICCV 2021; :mod:`contrastlab.objectives.feature_transform`), which
upstream ran only with a queue, maps onto the in-batch loss as follows: query ``i`` and its own (local)
key are extrapolated with the pair's coefficient; the negatives of query ``i`` are the other keys of the
gathered batch, each interpolated with a random partner drawn from all ``world_size * N`` keys (the partner
may be the query's own key), the mixture at the positive's index removed. The gathered keys themselves are
never modified. The info dict then also holds ``pos_logits_raw`` and ``neg_logits_raw``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contrastlab.engine.distributed import gather_no_grad, get_rank
from contrastlab.errors import ConfigError
from contrastlab.objectives.feature_transform import FeatureTransform

__all__ = ["BatchInfoNCELoss"]


def split_positive(logits: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``r``'s positive logit ``logits[r, positive[r]]`` ``[n]`` and its other columns in order ``[n, K - 1]``.

    The same values as boolean-mask indexing, by gathers: static shapes, so the device is never asked how many
    elements a mask selected (a host synchronisation on GPUs). Gradients flow through both.

    Example:
        >>> pos, neg = split_positive(torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]), torch.tensor([1, 0]))
        >>> pos.tolist(), neg.tolist()
        ([1.0, 3.0], [[0.0, 2.0], [4.0, 5.0]])
    """
    n, k = logits.shape
    columns = torch.arange(k - 1, device=logits.device).expand(n, -1)
    columns = columns + (columns >= positive[:, None]).long()
    return logits.gather(1, positive[:, None]).squeeze(1), logits.gather(1, columns)


class BatchInfoNCELoss(nn.Module):
    """``2 * tau * CE(q k_all^T / tau, r * N + arange(N))`` with ``q, k`` L2-normalised.

    Args:
        temperature: ``tau`` (MoCo v3: 1.0 for ResNet, 0.2 for ViT).
        scale_by_temperature: multiply by ``2 * tau`` as the released code does; ``False`` gives plain
            InfoNCE.
        feature_transform: optional FT hook (see the module docstring for how it maps onto the batch).

    ``forward(q, k)`` takes this rank's ``q [N, D]`` (with gradient) and ``k [N, D]`` (treated as constants,
    gathered across ranks) and returns ``(loss, info)``; ``info`` holds, detached, ``pos_logits [N]`` and
    ``neg_logits [N, world_size * N - 1]`` (the logits the loss saw, positive column removed); with a
    feature transform also ``pos_logits_raw`` and ``neg_logits_raw``, the same without the transform.

    Example:
        >>> loss, info = BatchInfoNCELoss(temperature=1.0)(torch.randn(4, 8), torch.randn(4, 8))
        >>> info["neg_logits"].shape
        torch.Size([4, 3])
    """

    def __init__(self, temperature: float = 1.0, scale_by_temperature: bool = True,
                 feature_transform: FeatureTransform | None = None) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"MoCo v3 temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.scale_by_temperature = scale_by_temperature
        self.feature_transform = feature_transform

    def _logits(self, similarity: torch.Tensor) -> torch.Tensor:
        # Softmax in at least float32 (bf16/fp16 similarities under autocast lose too much).
        return similarity.to(torch.promote_types(similarity.dtype, torch.float32)) / self.temperature

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if q.shape != k.shape or q.dim() != 2:
            raise ValueError(f"q and k must both be [N, D], got {tuple(q.shape)} and {tuple(k.shape)}")
        q = F.normalize(q, dim=1)
        local_keys = F.normalize(k.detach(), dim=1)
        keys = gather_no_grad(local_keys).to(q.dtype)
        n = q.shape[0]
        labels = torch.arange(n, device=q.device) + n * get_rank()
        ft = self.feature_transform
        transformed = ft is not None and ft.active
        with torch.set_grad_enabled(torch.is_grad_enabled() and not transformed):  # FT: raw logits only reported
            raw = self._logits(q @ keys.T)
        detached = raw.detach()
        raw_pos, raw_neg = split_positive(detached, labels)
        if transformed:
            q_ft, k_ft, mixed = ft(q, local_keys.to(q.dtype), keys)[:3]
            pos = (q_ft * k_ft).sum(dim=1, keepdim=True)
            neg = split_positive(q_ft @ mixed.T, labels)[1]
            logits = self._logits(torch.cat([pos, neg], dim=1))
            loss = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device=q.device))
            pos_logits, neg_logits = logits.detach()[:, 0], logits.detach()[:, 1:]
        else:
            loss = F.cross_entropy(raw, labels)
            pos_logits, neg_logits = raw_pos, raw_neg
        if self.scale_by_temperature:
            loss = loss * (2.0 * self.temperature)
        info = {"pos_logits": pos_logits, "neg_logits": neg_logits}
        if ft is not None:
            info["pos_logits_raw"], info["neg_logits_raw"] = raw_pos, raw_neg
        return loss, info
