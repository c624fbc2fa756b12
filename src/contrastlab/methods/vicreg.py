"""VICReg: two views, one network, a loss that keeps each embedding dimension's variance up and decorrelates them.

Bardes, Ponce, LeCun, "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning",
ICLR 2022; released code facebookresearch/vicreg (``main_vicreg.py``).

Both views go through the same backbone and expander, one view at a time as released (so each BatchNorm
normalises each view over its own batch; SyncBN over every rank's share of it with ``model.sync_bn``). The
expander is ``proj_layers`` Linear layers, BatchNorm and ReLU after each but the last (``--mlp 8192-8192-8192`` on
a ResNet-50: ``2048 -> 8192 -> 8192 -> 8192``). Its last Linear has no bias, as released (``proj_last_bias``;
solo-learn's has one). The hidden Linears have no bias either (the release gives them one, which the BatchNorm
after them cancels: it receives no gradient and changes no output). No predictor, no momentum encoder, no
stop-gradient. The loss is :class:`~contrastlab.objectives.VICRegLoss`; its three unweighted terms are the step's
loss parts ``invariance``, ``variance`` and ``covariance``. With more than two views (``views.planner=multicrop``)
the first two are used, as the release has no multi-crop.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from contrastlab.methods.base import Method, StepOutput, capped_sizes
from contrastlab.models.heads import build_mlp
from contrastlab.objectives.vicreg import VICRegLoss
from contrastlab.registry import register_method

__all__ = ["VICReg"]


@register_method()
class VICReg(Method):
    """VICReg with a BN-MLP expander.

    Args:
        backbone: feature extractor ``[B, 3, H, W] -> [B, feature_dim]``.
        feature_dim: its output dimension.
        proj_hidden_dim: width of the expander's hidden layers (8192 released).
        proj_out_dim: embedding dimension ``D`` (8192 released).
        proj_layers: Linear layers of the expander (3 released).
        proj_last_bias: a bias on the expander's last Linear (released: none; solo-learn: one).
        sim_coeff: invariance weight (25).
        std_coeff: variance weight, on the mean of the two views' terms (25).
        cov_coeff: covariance weight, on the sum of the two views' terms (1).
        eps: added to each variance under the square root (1e-4).
        gather_distributed: variance and covariance over every rank's embeddings (released); the invariance term
            is per rank.
        variance_scope: ``"global"`` (released: the variance over the gathered batch) or ``"rank"`` (each rank's
            own images); see :mod:`contrastlab.objectives.vicreg`.

    Example:
        >>> from contrastlab.models import build_backbone
        >>> net, dim = build_backbone("resnet20", width=0.25)
        >>> method = VICReg(net, dim, proj_hidden_dim=32, proj_out_dim=32)
        >>> out = method([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)], None, None)
        >>> sorted(out.parts)
        ['covariance', 'invariance', 'variance']
    """

    name = "vicreg"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        proj_hidden_dim: int = 8192,
        proj_out_dim: int = 8192,
        proj_layers: int = 3,
        proj_last_bias: bool = False,
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        eps: float = 1e-4,
        gather_distributed: bool = True,
        variance_scope: str = "global",
    ) -> None:
        super().__init__(backbone, feature_dim)
        self.projector = build_mlp(feature_dim, proj_hidden_dim, proj_out_dim, proj_layers, bias=proj_last_bias)
        self.criterion = VICRegLoss(sim_coeff=sim_coeff, std_coeff=std_coeff, cov_coeff=cov_coeff, eps=eps,
                                    gather_distributed=gather_distributed, variance_scope=variance_scope)

    @classmethod
    def smoke_overrides(cls, params: dict[str, Any]) -> list[str]:
        """``--smoke`` trains the expander at most 512 wide (the release's 8192 makes a 2-step CPU run slow and its
        checkpoint 1.2 GB); the code path is the same."""
        return capped_sizes(params, {"proj_hidden_dim": 512, "proj_out_dim": 512})

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        x1, x2 = self._two_views(views)
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        loss, terms = self.criterion(z1, z2)
        return StepOutput(loss=loss, outputs={"embeddings": z1.detach()}, parts=terms)
