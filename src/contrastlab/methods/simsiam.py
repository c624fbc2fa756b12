"""SimSiam: a siamese network with a predictor and a stop-gradient, no momentum encoder, no negatives.

Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021.

Projector: 3 Linear layers, BN after each of them including the output Linear (without affine there,
as in the reference code), ReLU after the hidden ones. Predictor: a 2-layer bottleneck
``proj_out_dim -> pred_hidden_dim -> proj_out_dim`` with BN and ReLU in the hidden layer only. Loss
(equation (2)): ``L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2`` with ``D`` the negative cosine. The
paper keeps the predictor's learning rate fixed (not decayed): :meth:`SimSiam.param_groups` flags the
predictor groups ``fixed_lr=True`` for the scheduler.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from contrastlab.methods.base import Method, StepOutput, make_param_groups
from contrastlab.models.heads import build_mlp
from contrastlab.objectives.cosine import NegativeCosineSimilarity
from contrastlab.registry import register_method

__all__ = ["SimSiam"]


@register_method()
class SimSiam(Method):
    """SimSiam with a 3-layer projector and a 2-layer predictor.

    Args:
        backbone: feature extractor ``[B, 3, H, W] -> [B, feature_dim]``.
        feature_dim: its output dimension.
        proj_hidden_dim: hidden width of the projector.
        proj_out_dim: output dimension of the projector and of the predictor.
        pred_hidden_dim: bottleneck width of the predictor.
        fixed_predictor_lr: flag the predictor's parameter groups ``fixed_lr=True``.

    Example:
        >>> from contrastlab.models import build_backbone
        >>> net, dim = build_backbone("resnet20", width=0.25)
        >>> method = SimSiam(net, dim, proj_hidden_dim=32, proj_out_dim=32, pred_hidden_dim=8)
        >>> out = method([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)], None, None)
        >>> [g["name"] for g in method.param_groups() if g["fixed_lr"]]
        ['simsiam_predictor', 'simsiam_predictor_1d']
    """

    name = "simsiam"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        proj_hidden_dim: int = 2048,
        proj_out_dim: int = 2048,
        pred_hidden_dim: int = 512,
        fixed_predictor_lr: bool = True,
    ) -> None:
        super().__init__(backbone, feature_dim)
        self.projector = build_mlp(
            feature_dim, proj_hidden_dim, proj_out_dim, 3, last_bn=True, last_bn_affine=False
        )
        self.predictor = build_mlp(proj_out_dim, pred_hidden_dim, proj_out_dim, 2)
        self.criterion = NegativeCosineSimilarity()
        self.fixed_predictor_lr = fixed_predictor_lr

    def param_groups(self) -> list[dict[str, Any]]:
        predictor_ids = {id(p) for p in self.predictor.parameters()}
        rest = [p for p in self.parameters() if id(p) not in predictor_ids]
        return make_param_groups(self.name, rest) + make_param_groups(
            f"{self.name}_predictor", self.predictor.parameters(), fixed_lr=self.fixed_predictor_lr
        )

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        x1, x2 = self._two_views(views)
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss_12 = self.criterion(p1, z2.detach())
        loss_21 = self.criterion(p2, z1.detach())
        loss = 0.5 * (loss_12 + loss_21)
        return StepOutput(
            loss=loss,
            outputs={"embeddings": z1.detach()},
            parts={"simsiam_12": loss_12.detach(), "simsiam_21": loss_21.detach()},
        )
