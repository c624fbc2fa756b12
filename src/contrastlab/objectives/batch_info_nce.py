"""In-batch InfoNCE against keys gathered from every rank: MoCo v3's loss.

Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021, algorithm 1:
the queries ``q [N, D]`` of this rank are contrasted against the keys ``k`` of the whole global batch
(``[world_size * N, D]``, gathered without gradient); query ``i`` of rank ``r`` has its positive at
global index ``r * N + i`` and every other key of the global batch as a negative. The cross-entropy is
scaled by ``2 * tau`` (the released code's choice: it makes the gradient scale independent of ``tau``).

Each rank averages over its own ``N`` queries; data-parallel gradient averaging then gives the mean over
the global batch, so ``n`` ranks with ``N`` images each train exactly as one process with ``n * N``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contrastlab.engine.distributed import gather_no_grad, get_rank
from contrastlab.errors import ConfigError

__all__ = ["BatchInfoNCELoss"]


class BatchInfoNCELoss(nn.Module):
    """``2 * tau * CE(q k_all^T / tau, r * N + arange(N))`` with ``q, k`` L2-normalised.

    Args:
        temperature: ``tau`` (MoCo v3: 1.0 for ResNet, 0.2 for ViT).
        scale_by_temperature: multiply by ``2 * tau`` as the released code does; ``False`` gives plain
            InfoNCE.

    ``forward(q, k)`` takes this rank's ``q [N, D]`` (with gradient) and ``k [N, D]`` (treated as constants,
    gathered across ranks) and returns ``(loss, info)``; ``info`` holds, detached, ``pos_logits [N]`` and
    ``neg_logits [N, world_size * N - 1]`` (the logits the loss saw, positive column removed).

    Example:
        >>> loss, info = BatchInfoNCELoss(temperature=1.0)(torch.randn(4, 8), torch.randn(4, 8))
        >>> info["neg_logits"].shape
        torch.Size([4, 3])
    """

    def __init__(self, temperature: float = 1.0, scale_by_temperature: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"MoCo v3 temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.scale_by_temperature = scale_by_temperature

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if q.shape != k.shape or q.dim() != 2:
            raise ValueError(f"q and k must both be [N, D], got {tuple(q.shape)} and {tuple(k.shape)}")
        q = F.normalize(q, dim=1)
        keys = gather_no_grad(F.normalize(k.detach(), dim=1))
        similarity = q @ keys.to(q.dtype).T
        # Softmax in at least float32 (bf16/fp16 similarities under autocast lose too much).
        logits = similarity.to(torch.promote_types(similarity.dtype, torch.float32)) / self.temperature
        n = q.shape[0]
        labels = torch.arange(n, device=q.device) + n * get_rank()
        loss = F.cross_entropy(logits, labels)
        if self.scale_by_temperature:
            loss = loss * (2.0 * self.temperature)
        detached = logits.detach()
        positive = torch.zeros_like(detached, dtype=torch.bool)
        positive[torch.arange(n, device=q.device), labels] = True
        info = {"pos_logits": detached[positive], "neg_logits": detached[~positive].view(n, -1)}
        return loss, info
