"""SwAV's loss: Sinkhorn-Knopp codes and the swapped prediction over multi-crop.

Caron, Misra, Mairal, Goyal, Bojanowski, Joulin, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", NeurIPS 2020 (section 3.1, equations (2)-(3), appendix A.1); the released code is
facebookresearch/swav, ``main_swav.py`` (``distributed_sinkhorn`` and the loss in ``train``).

**Codes** (:func:`sinkhorn_knopp`). For ``N`` embeddings scored against ``K`` prototypes, ``Q = exp(S / epsilon)``
(transposed to ``[K, N]``) is scaled to total 1, then ``iterations`` times: each prototype's row to ``1 / K``, each
sample's column to ``1 / N``; finally the columns are multiplied by ``N``, so each sample's code sums to 1. Under
DDP (``gather_distributed=True``) the row sums and the total are all-reduced over the ranks and ``N`` counts the
samples of every rank: the codes are those of one Sinkhorn on the global batch (the release's
``distributed_sinkhorn``), while each rank keeps only its own columns. The scores are shifted by their global
maximum before the exponential (a constant factor, cancelled by the first scaling; it keeps ``exp`` finite for a
small ``epsilon``) and the whole computation runs in at least float32.

**Swapped prediction** (:func:`swapped_prediction_loss`). For each crop ``a`` in ``crops_for_assign`` with codes
``q_a``, every other crop ``v`` predicts them through ``p_v = softmax(S_v / temperature)``:
``loss = 1/|A| sum_a 1/(V - 1) sum_{v != a} mean_batch( -sum_k q_a log p_v )``, ``V`` the number of crops (the
release's ``subloss / (np.sum(nmb_crops) - 1)`` then ``loss /= len(crops_for_assign)``).

Example:
    >>> loss_fn = SwAVLoss(temperature=0.1, epsilon=0.05, sinkhorn_iterations=3)
    >>> z = [torch.nn.functional.normalize(torch.randn(8, 16), dim=1) for _ in range(4)]
    >>> prototypes = torch.nn.functional.normalize(torch.randn(30, 16), dim=1)
    >>> loss, info = loss_fn([v @ prototypes.t() for v in z])
    >>> info["codes"].shape  # one code per assigned crop (0 and 1) and image
    torch.Size([2, 8, 30])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from contrastlab.engine.distributed import get_world_size
from contrastlab.errors import ConfigError

__all__ = ["SwAVLoss", "sinkhorn_knopp", "swapped_prediction_loss"]


def _all_reduce_(x: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """``x`` reduced over every rank, in place (``x`` itself in a single process)."""
    if get_world_size() > 1:
        dist.all_reduce(x, op=op)
    return x


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3,
                   gather_distributed: bool = False) -> torch.Tensor:
    """SwAV's codes of ``scores`` (see the module docstring): ``[N, K] -> [N, K]``, each row summing to 1.

    Args:
        scores: prototype scores of this rank's ``N`` samples (cosines in SwAV).
        epsilon: entropic regularisation (0.05 in the paper).
        iterations: alternating row and column scalings (3).
        gather_distributed: the Sinkhorn of the samples of every rank together (sums all-reduced); this rank's rows.

    Example:
        >>> codes = sinkhorn_knopp(torch.randn(6, 4), epsilon=0.5, iterations=3)
        >>> torch.allclose(codes.sum(dim=1), torch.ones(6))
        True
    """
    if epsilon <= 0:
        raise ConfigError(f"method.epsilon (Sinkhorn regularisation) must be positive, got {epsilon}")
    if iterations < 0:
        raise ConfigError(f"method.sinkhorn_iterations must be >= 0, got {iterations}")
    reduce = _all_reduce_ if gather_distributed else (lambda x, op=None: x)
    logits = scores.detach().to(torch.promote_types(scores.dtype, torch.float32)) / epsilon
    top = reduce(logits.max().reshape(1), dist.ReduceOp.MAX)
    q = torch.exp(logits - top).t()  # [K, N]
    num_prototypes = q.shape[0]
    num_samples = q.shape[1] * (get_world_size() if gather_distributed else 1)
    q /= reduce(q.sum().reshape(1))
    for _ in range(iterations):
        q /= reduce(q.sum(dim=1, keepdim=True))  # each prototype's total weight ...
        q /= num_prototypes  # ... 1 / K
        q /= q.sum(dim=0, keepdim=True)  # each sample's total weight ...
        q /= num_samples  # ... 1 / N
    q *= num_samples  # each sample's code sums to 1
    return q.t()


def swapped_prediction_loss(scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor],
                            crops_for_assign: Sequence[int], temperature: float = 0.1) -> torch.Tensor:
    """SwAV's swapped prediction: crop ``crops_for_assign[i]``'s ``codes[i]`` predicted from every other crop.

    Args:
        scores: one ``[B, K]`` tensor of prototype scores per crop (the gradient flows through them).
        codes: one ``[B, K]`` target per assigned crop (no gradient).
        crops_for_assign: the crop each code belongs to.
        temperature: divides the scores before the softmax (0.1).

    Returns:
        ``1/|A| sum_i 1/(V-1) sum_{v != a_i} mean_b(-sum_k codes[i] * log_softmax(scores[v] / temperature))``.
    """
    if temperature <= 0:
        raise ConfigError(f"method.temperature must be positive, got {temperature}")
    if len(scores) < 2:
        raise ConfigError(f"SwAV's swapped prediction needs at least 2 crops per image, got {len(scores)}")
    if len(codes) != len(crops_for_assign) or not codes:
        raise ConfigError(f"{len(codes)} codes for crops_for_assign={list(crops_for_assign)}: one code per crop")
    log_p = [F.log_softmax(s.to(torch.promote_types(s.dtype, torch.float32)) / temperature, dim=1) for s in scores]
    loss = log_p[0].new_zeros(())
    for crop, q in zip(crops_for_assign, codes):
        sub = sum(-(q * log_p[v]).sum(dim=1).mean() for v in range(len(scores)) if v != crop)
        loss = loss + sub / (len(scores) - 1)
    return loss / len(crops_for_assign)


class SwAVLoss(nn.Module):
    """SwAV's loss on the prototype scores of every crop, with optional queued scores for the codes.

    Args:
        temperature: of the predictions' softmax (0.1).
        epsilon: Sinkhorn's regularisation (0.05).
        sinkhorn_iterations: Sinkhorn's scalings (3).
        crops_for_assign: crops whose codes are computed and predicted (the two global crops, ``(0, 1)``).
        gather_distributed: Sinkhorn over the global batch (every rank's samples; the release).

    The forward pass takes ``scores``, a list of ``[B, K]`` per crop, and optionally ``queue_scores``, one
    ``[L, K]`` (or ``None``) per assigned crop: the scores of queued embeddings, placed before the batch's in the
    Sinkhorn (only the batch's codes are kept). It returns ``(loss, info)`` with ``info["codes"]`` ``[A, B, K]``.
    """

    def __init__(self, temperature: float = 0.1, epsilon: float = 0.05, sinkhorn_iterations: int = 3,
                 crops_for_assign: Sequence[int] = (0, 1), gather_distributed: bool = False) -> None:
        super().__init__()
        for name, value in (("temperature", temperature), ("epsilon", epsilon)):
            if value <= 0:
                raise ConfigError(f"method.{name} must be positive, got {value}")
        if isinstance(sinkhorn_iterations, bool) or not isinstance(sinkhorn_iterations, int) or sinkhorn_iterations < 1:
            raise ConfigError(f"method.sinkhorn_iterations must be a positive integer, got {sinkhorn_iterations!r}")
        crops = list(crops_for_assign)
        if not crops or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in crops) \
                or len(set(crops)) != len(crops):
            raise ConfigError(f"method.crops_for_assign must be distinct crop indices >= 0 (e.g. [0, 1], the global "
                              f"crops), got {crops_for_assign!r}")
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.crops_for_assign = crops
        self.gather_distributed = gather_distributed

    def codes(self, scores: torch.Tensor, queue_scores: torch.Tensor | None = None) -> torch.Tensor:
        """The Sinkhorn codes of the ``B`` rows of ``scores``, computed with ``queue_scores`` placed before them."""
        batch = scores.shape[0]
        if queue_scores is not None:
            scores = torch.cat([queue_scores.to(scores.dtype), scores.detach()])
        return sinkhorn_knopp(scores, self.epsilon, self.sinkhorn_iterations, self.gather_distributed)[-batch:]

    def forward(self, scores: Sequence[torch.Tensor],
                queue_scores: Sequence[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, dict]:
        if max(self.crops_for_assign) >= len(scores):
            raise ConfigError(f"method.crops_for_assign={self.crops_for_assign} names crop "
                              f"{max(self.crops_for_assign)}, but each image has {len(scores)} crops: use indices "
                              f"below {len(scores)} (the global crops come first)")
        queued = list(queue_scores) if queue_scores is not None else [None] * len(self.crops_for_assign)
        codes = [self.codes(scores[a], q) for a, q in zip(self.crops_for_assign, queued)]
        loss = swapped_prediction_loss(scores, codes, self.crops_for_assign, self.temperature)
        return loss, {"codes": torch.stack(codes)}
