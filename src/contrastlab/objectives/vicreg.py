"""VICReg's variance-invariance-covariance loss.

Bardes, Ponce, LeCun, "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning",
ICLR 2022; released code facebookresearch/vicreg, ``main_vicreg.py`` (``VICReg.forward``).

For two batches of embeddings ``Z, Z'`` (``[N, D]``, one row per image), with ``Z~ = Z - mean(Z)``:

- invariance ``s = mean over N and D of (Z - Z')^2`` (``F.mse_loss``, in the code and the paper's pseudocode;
  the paper's formula sums over the dimensions: ``D`` times this);
- variance ``v(Z) = (1/D) sum_j relu(1 - sqrt(Var(Z_j) + eps))``, ``Var`` the unbiased variance over the batch,
  ``eps = 1e-4``; the loss takes ``(v(Z) + v(Z')) / 2`` (the released code; the paper's loss and its pseudocode
  add the two views: twice this, so ``std_coeff = 2 mu`` reproduces them);
- covariance ``c(Z) = (1/D) sum_{i != j} C_ij^2`` with ``C = Z~^T Z~ / (N - 1)``; the loss takes
  ``c(Z) + c(Z')``;
- ``loss = sim_coeff * s + std_coeff * (v(Z) + v(Z')) / 2 + cov_coeff * (c(Z) + c(Z'))`` (25, 25, 1).

**Several ranks** (``gather_distributed=True``), as released: the invariance term is each rank's own mean over
its ``B`` images (before any gather); both embeddings are then gathered from every rank with gradient
(:func:`~contrastlab.engine.distributed.gather_with_grad`, the release's ``FullGatherLayer``) and the variance and
covariance terms are computed on the global batch of ``N = W * B`` images, identically on every rank. Under DDP,
which averages parameter gradients over the ``W`` ranks, the total gradient is then exactly the single-process
gradient on the global batch when every rank holds ``B`` images: the gather's backward sums the ``W`` identical
global terms' gradients into each rank's slice (``W`` times the single-process gradient, divided by ``W`` again by
DDP), and the mean over ranks of the per-rank invariance terms is the global invariance term. Each rank's
``loss`` differs (its own invariance term); their mean is the single-process loss.

``variance_scope`` chooses the batch of the variance term under ``gather_distributed``: ``"global"`` (released,
the gathered batch) or ``"rank"`` (each rank's own ``B`` images, centred on their own mean; the total gradient is
then that of the mean over ranks of the per-rank variance terms). The covariance term always uses the gathered
batch when ``gather_distributed``. Without it, every term is computed on the batch given (any number of ranks).

Everything runs in at least float32 with autocast off: the ``D x D`` covariance in bf16 keeps three digits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contrastlab.engine.distributed import gather_with_grad, get_world_size
from contrastlab.errors import ConfigError

__all__ = ["VARIANCE_SCOPES", "VICRegLoss", "covariance_term", "invariance_term", "variance_term"]

VARIANCE_SCOPES = ("global", "rank")
"""The batch of the variance term under several ranks: the gathered global batch (released) or each rank's own."""


def invariance_term(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Mean over the batch and the dimensions of ``(z1 - z2)^2`` (the release's ``F.mse_loss``)."""
    return F.mse_loss(z1, z2)


def variance_term(z: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``mean_j relu(1 - sqrt(Var(z_j) + eps))`` with the unbiased variance of each column over the batch."""
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(1.0 - std).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """Sum of the squared off-diagonal entries of the covariance ``Z~^T Z~ / (N - 1)``, divided by ``D``."""
    batch, dim = z.shape
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (batch - 1)
    cov.diagonal().zero_()  # the diagonal holds the variances; the matmul's backward does not need cov itself
    return cov.pow(2).sum() / dim


class VICRegLoss(nn.Module):
    """VICReg's loss on two views' embeddings, optionally with the variance and covariance over every rank.

    Args:
        sim_coeff: weight of the invariance term (lambda, 25).
        std_coeff: weight of the variance term, averaged over the two views (mu, 25).
        cov_coeff: weight of the covariance term, summed over the two views (nu, 1).
        eps: added to each variance before the square root (1e-4).
        gather_distributed: compute the variance and covariance terms on the embeddings of every rank
            (gathered with gradient), as released; the invariance term stays per rank.
        variance_scope: ``"global"`` (released) or ``"rank"``: the batch of the variance term under
            ``gather_distributed`` (module docstring).

    Raises:
        ConfigError: a negative coefficient, ``eps <= 0``, or an unknown ``variance_scope``.

    The forward pass takes ``z1, z2`` ``[B, D]`` and returns ``(loss, terms)``: ``terms`` holds the unweighted,
    detached ``invariance``, ``variance`` (the mean over the two views) and ``covariance`` (the sum over the two
    views). A batch (global, or per rank for the ``"rank"`` scope) of fewer than 2 embeddings is a ValueError: its
    variance is undefined.

    Example:
        >>> loss_fn = VICRegLoss()
        >>> z1, z2 = torch.randn(8, 32), torch.randn(8, 32)
        >>> loss, terms = loss_fn(z1, z2)
        >>> sorted(terms)
        ['covariance', 'invariance', 'variance']
    """

    def __init__(
        self, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0, eps: float = 1e-4,
        gather_distributed: bool = False, variance_scope: str = "global",
    ) -> None:
        super().__init__()
        for key, value in (("sim_coeff", sim_coeff), ("std_coeff", std_coeff), ("cov_coeff", cov_coeff)):
            if value < 0:
                raise ConfigError(f"method.{key} must be >= 0 (a loss weight), got {value}")
        if eps <= 0:
            raise ConfigError(f"method.eps must be > 0 (it keeps the square root of a zero variance "
                              f"differentiable; released 1e-4), got {eps}")
        if variance_scope not in VARIANCE_SCOPES:
            raise ConfigError(f"method.variance_scope must be one of {', '.join(VARIANCE_SCOPES)} (global: the "
                              f"variance over every rank's images, as released), got {variance_scope!r}")
        self.sim_coeff, self.std_coeff, self.cov_coeff = sim_coeff, std_coeff, cov_coeff
        self.eps = eps
        self.gather_distributed = gather_distributed
        self.variance_scope = variance_scope

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if z1.shape != z2.shape or z1.dim() != 2:
            raise ValueError(f"z1 and z2 must both be [B, D], got {tuple(z1.shape)} and {tuple(z2.shape)}")
        dtype = torch.promote_types(z1.dtype, torch.float32)
        with torch.autocast(z1.device.type, enabled=False):
            z1, z2 = z1.to(dtype), z2.to(dtype)
            invariance = invariance_term(z1, z2)
            if self.gather_distributed and get_world_size() > 1:
                g1, g2 = gather_with_grad(z1), gather_with_grad(z2)
            else:
                g1, g2 = z1, z2
            v1, v2 = (z1, z2) if self.variance_scope == "rank" else (g1, g2)
            if min(v1.shape[0], g1.shape[0]) < 2:
                raise ValueError(f"VICReg's variance and covariance need at least 2 embeddings per batch, got "
                                 f"{v1.shape[0]}: raise data.batch_size")
            variance = (variance_term(v1, self.eps) + variance_term(v2, self.eps)) / 2
            covariance = covariance_term(g1) + covariance_term(g2)
            loss = self.sim_coeff * invariance + self.std_coeff * variance + self.cov_coeff * covariance
        terms = {"invariance": invariance.detach(), "variance": variance.detach(), "covariance": covariance.detach()}
        return loss, terms
