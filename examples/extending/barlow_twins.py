"""A method of your own, written as Barlow Twins is (Zbontar, Jing, Misra, LeCun, Deny, ICML 2021).

contrastlab ships Barlow Twins as a built-in method (``method.name=barlow_twins``); this file shows how such a
method is written outside the package, under a name of its own. The two views' projections are standardised over
the batch; their cross-correlation matrix ``C`` is pushed to the identity:
``sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2``. Register the class with ``contrastlab.register_method`` and
select it with ``method.name=my_barlow_twins``; its constructor's keyword arguments are its config keys
(``method.proj_hidden_dim=...``).
"""

from __future__ import annotations

import torch

import contrastlab
from contrastlab.models.heads import build_mlp


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The on-diagonal and off-diagonal terms for projections ``[B, D]`` of two views."""
    batch = z1.shape[0]
    z1 = (z1 - z1.mean(0)) / z1.std(0, unbiased=False).clamp_min(1e-6)
    z2 = (z2 - z2.mean(0)) / z2.std(0, unbiased=False).clamp_min(1e-6)
    c = z1.T @ z2 / batch
    on_diagonal = (torch.diagonal(c) - 1).pow(2).sum()
    off_diagonal = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diagonal, lambd * off_diagonal


@contrastlab.register_method()
class MyBarlowTwins(contrastlab.Method):
    """Barlow Twins with a 3-layer projector (BN and ReLU between its layers)."""

    name = "my_barlow_twins"

    def __init__(self, backbone, feature_dim, proj_hidden_dim: int = 2048, proj_out_dim: int = 2048,
                 lambd: float = 0.0051) -> None:
        super().__init__(backbone, feature_dim)
        self.projector = build_mlp(feature_dim, proj_hidden_dim, proj_out_dim, 3)
        self.lambd = lambd

    def forward(self, views, labels, index):
        x1, x2 = self._two_views(views)
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        on_diagonal, off_diagonal = barlow_twins_loss(z1, z2, self.lambd)
        return contrastlab.StepOutput(
            loss=on_diagonal + off_diagonal,
            outputs={"embeddings": z1.detach()},
            parts={"on_diagonal": on_diagonal.detach(), "off_diagonal": off_diagonal.detach()},
        )
