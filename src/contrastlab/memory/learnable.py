"""A learnable memory of embeddings trained by its own closed-form gradient: CaCo's negatives and positives.

Wang, Qi, "Contrastive Learning with Cooperative-Adversarial Negatives and Positives" (CaCo), TPAMI 2023;
the memory update inherits AdCo (Hu, Wang, Qi, "AdCo: Adversarial Contrast for Efficient Learning of
Unsupervised Representations from Self-Trained Negative Adversaries", CVPR 2021).

The memory is a matrix ``W`` of ``K`` columns of dimension ``d`` (``randn`` initialised, never
re-normalised) plus an SGD momentum buffer ``v``. Queries ``q`` (L2-normalised) are scored against the
column-normalised memory ``Ŵ``: ``S = q Ŵ`` (plain cosine similarities, no temperature).

The memory learns by a hand-written gradient at its own temperature ``tau_m`` (:func:`memory_gradient`):
for each query ``n`` with assigned positive column ``y_n`` and ``P = softmax(S / tau_m)``, let ``A = P``
except ``A[n, y_n] = 1 - P[n, y_n]``; then column ``j`` receives

    g_j = -(1 / (tau_m * ||w_j||)) * (1/B) * sum_n A[n, j] * (q_n - S[n, j] * ŵ_j)

and the step is ``v <- mu * v + g``, ``W <- W - lr * v``. Because ``A`` equals ``+dL/dz`` on negative
entries and ``-dL/dz`` on the assigned positive (``L`` the cross-entropy at ``tau_m``), the step *ascends*
the loss on negatives (adversarial negatives) and *descends* it on positives (cooperative positives). The
term ``S[n, j] * ŵ_j`` is the derivative through the column normalisation (maple-research-lab/AdCo
issue #8). There is no weight decay, as released.

Distributed training: the memory is a buffer that DDP must not touch (see
:meth:`contrastlab.methods.base.Method.ddp_ignored_buffers`); :meth:`LearnableMemory.step` averages ``g``
over ranks before applying it, so memories that start equal stay equal.

Example:
    >>> memory = LearnableMemory(dim=16, size=64)
    >>> q = F.normalize(torch.randn(4, 16), dim=1)
    >>> sims = memory.similarities(q)
    >>> g = memory_gradient(q, sims, memory.assign(q), memory.normalized(), memory.column_norms(), 0.08)
    >>> memory.step(g, lr=3.0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contrastlab.engine.distributed import all_reduce_mean, broadcast_
from contrastlab.errors import ConfigError

__all__ = ["LearnableMemory", "memory_gradient"]


@torch.no_grad()
def memory_gradient(
    queries: torch.Tensor,
    similarities: torch.Tensor,
    positives: torch.Tensor,
    normalized_memory: torch.Tensor,
    column_norms: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """CaCo's closed-form memory update direction ``g`` for one view (see the module docstring).

    Args:
        queries: ``[B, d]`` L2-normalised queries (the online embeddings, before the encoder step).
        similarities: ``[B, K]`` their cosine similarities to the memory, ``queries @ normalized_memory``.
        positives: ``[B]`` the assigned positive column of each query.
        normalized_memory: ``[d, K]`` the column-normalised memory ``Ŵ``.
        column_norms: ``[K]`` the norms ``||w_j||`` of the raw columns.
        temperature: ``tau_m``.

    Returns:
        ``g`` of shape ``[d, K]`` in float32 or wider; the memory moves by ``-lr * g`` (through momentum).
    """
    dtype = torch.promote_types(similarities.dtype, torch.float32)
    sims = similarities.to(dtype)
    q = queries.to(dtype)
    batch = sims.shape[0]
    weights = torch.softmax(sims / temperature, dim=1)
    rows = torch.arange(batch, device=sims.device)
    weights[rows, positives] = 1.0 - weights[rows, positives]
    pulled = q.T @ weights / batch  # (1/B) sum_n A[n, j] q_n        [d, K]
    radial = (weights * sims).mean(dim=0)  # (1/B) sum_n A[n, j] S[n, j]   [K]
    direction = pulled - normalized_memory.to(dtype) * radial
    return -direction / (temperature * column_norms.to(dtype))


class LearnableMemory(nn.Module):
    """``K`` learnable memory columns of dimension ``d`` with an SGD momentum buffer (CaCo, AdCo).

    Args:
        dim: embedding dimension ``d`` (CaCo: 256).
        size: number of columns ``K`` (CaCo: 65536).
        momentum: SGD momentum ``mu`` of the memory update (CaCo: 0.9).
        generator: RNG of the ``randn`` initialisation; ``None`` draws from torch's global RNG (seeded
            identically on every rank by the trainer; the trainer also broadcasts rank 0's memory).

    Attributes:
        weight: ``[d, K]`` buffer ``W``, the raw (unnormalised) columns.
        velocity: ``[d, K]`` buffer ``v``, the momentum of the memory update.
    """

    weight: torch.Tensor
    velocity: torch.Tensor

    def __init__(self, dim: int = 256, size: int = 65536, momentum: float = 0.9,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if dim < 1 or size < 1:
            raise ConfigError(f"the learnable memory needs dim >= 1 and size >= 1, got dim={dim}, size={size}")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"memory momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.register_buffer("weight", torch.randn(dim, size, generator=generator))
        self.register_buffer("velocity", torch.zeros(dim, size))

    @property
    def dim(self) -> int:
        """Embedding dimension ``d``."""
        return self.weight.shape[0]

    @property
    def size(self) -> int:
        """Number of columns ``K``."""
        return self.weight.shape[1]

    def normalized(self) -> torch.Tensor:
        """``Ŵ``: the memory with every column scaled to unit norm, ``[d, K]``."""
        return F.normalize(self.weight, dim=0)

    def column_norms(self) -> torch.Tensor:
        """``||w_j||`` of every raw column, ``[K]``."""
        return torch.linalg.vector_norm(self.weight, dim=0)

    def similarities(self, queries: torch.Tensor, normalized: torch.Tensor | None = None) -> torch.Tensor:
        """Cosine similarities ``queries @ Ŵ`` in float32 (autocast off: a K-way softmax needs it), ``[B, K]``.

        Gradients flow into ``queries``; the memory is a buffer and takes none.
        """
        memory = self.normalized() if normalized is None else normalized
        with torch.autocast(queries.device.type, enabled=False):
            return queries.float() @ memory.float()

    @torch.no_grad()
    def assign(self, keys: torch.Tensor, normalized: torch.Tensor | None = None) -> torch.Tensor:
        """Index of the most similar memory column for each key (CaCo's cooperative positive), ``[B]``."""
        return self.similarities(keys, normalized).argmax(dim=1)

    @torch.no_grad()
    def step(self, gradient: torch.Tensor, lr: float, gather_distributed: bool = True) -> None:
        """``v <- mu * v + mean_ranks(g)``, ``W <- W - lr * v`` (no weight decay, no re-normalisation)."""
        if gradient.shape != self.weight.shape:
            raise ValueError(f"memory gradient must be {tuple(self.weight.shape)}, got {tuple(gradient.shape)}")
        if gather_distributed:
            gradient = all_reduce_mean(gradient)
        self.velocity.mul_(self.momentum).add_(gradient.to(self.velocity.dtype))
        self.weight.add_(self.velocity, alpha=-lr)

    @torch.no_grad()
    def write(self, keys: torch.Tensor, start: int) -> int:
        """Write ``keys [n, d]`` into columns ``start, start + 1, ...`` (stopping at ``K``); returns how many."""
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be [n, {self.dim}], got {tuple(keys.shape)}")
        count = max(0, min(keys.shape[0], self.size - start))
        self.weight[:, start:start + count] = keys[:count].T.to(self.weight.dtype)
        return count

    @torch.no_grad()
    def broadcast_(self, src: int = 0) -> None:
        """Copy rank ``src``'s memory and momentum to every rank (no-op in a single process)."""
        broadcast_(self.weight, src)
        broadcast_(self.velocity, src)

    @torch.no_grad()
    def statistics(self, similarities: torch.Tensor) -> dict[str, torch.Tensor]:
        """Detached diagnostics: column norms (mean, std) and, from ``similarities [B, K]`` of some
        queries, their mean similarity to the memory and their mean similarity to the closest column."""
        norms = self.column_norms()
        sims = similarities.detach()
        return {
            "memory_norm_mean": norms.mean(),
            "memory_norm_std": norms.std(),
            "memory_query_sim_mean": sims.mean(),
            "memory_query_sim_max": sims.max(dim=1).values.mean(),
        }
