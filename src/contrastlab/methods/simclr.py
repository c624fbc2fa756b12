"""SimCLR: contrast the two views of each image against every other view in the (global) batch.

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020.

Both views go through the backbone and the projector as one concatenated batch, as in the reference
code, so BatchNorm statistics are taken over both views (views of different sizes go separately). The loss is :class:`~contrastlab.objectives.NTXentLoss`
with negatives gathered from every rank.

``feature_transform`` (a mapping of :class:`~contrastlab.objectives.feature_transform.FeatureTransform`
options, or ``None``) adds Feature Transformation (Zhu et al., ICCV 2021) inside the loss; see
:mod:`contrastlab.objectives.nt_xent` for how it maps onto in-batch negatives. ``outputs`` then also hold
``pos_logits_raw`` / ``neg_logits_raw`` (before FT), and :meth:`Method.set_progress` tells FT the epoch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from contrastlab.methods.base import Method, StepOutput
from contrastlab.models.heads import build_mlp
from contrastlab.objectives.feature_transform import FeatureTransform, build_feature_transform
from contrastlab.objectives.nt_xent import NTXentLoss
from contrastlab.registry import register_method

__all__ = ["SimCLR"]


@register_method()
class SimCLR(Method):
    """SimCLR with a BN-MLP projector and NT-Xent.

    Args:
        backbone: feature extractor ``[B, 3, H, W] -> [B, feature_dim]``.
        feature_dim: its output dimension.
        proj_hidden_dim: hidden width of the projector.
        proj_out_dim: output dimension of the projector.
        proj_layers: Linear layers in the projector (BN and ReLU between them).
        proj_hidden_bn: BatchNorm after the hidden Linears (default); ``False`` gives ``Linear-ReLU-Linear`` with
            biases, ContrastiveCrop's released SimCLR head (``contrastlab import --from ccrop`` needs it).
        temperature: NT-Xent temperature.
        gather_distributed: take negatives from every rank.
        feature_transform: FT options (keys of :class:`FeatureTransform`; ``{}`` gives the published
            setting) or ``None`` (off).
        base_temperature: scale the loss by ``temperature / base_temperature`` (ContrastiveCrop's SimCLR
            recipes use 0.07; ``None`` = the plain loss), see :mod:`contrastlab.objectives.nt_xent`.

    Example:
        >>> from contrastlab.models import build_backbone
        >>> net, dim = build_backbone("resnet20", width=0.25)
        >>> method = SimCLR(net, dim, proj_hidden_dim=32, proj_out_dim=16)
        >>> out = method([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)], None, None)
        >>> out.outputs["neg_logits"].shape
        torch.Size([8, 6])
    """

    name = "simclr"
    min_batch_per_rank = 2
    min_batch_reason = "a view's negatives are the batch's other images (with 1 image the loss is 0 at every step)"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        proj_hidden_dim: int = 2048,
        proj_out_dim: int = 128,
        proj_layers: int = 2,
        temperature: float = 0.5,
        gather_distributed: bool = True,
        feature_transform: dict[str, Any] | FeatureTransform | None = None,
        base_temperature: float | None = None,
        proj_hidden_bn: bool = True,
    ) -> None:
        super().__init__(backbone, feature_dim)
        self.projector = build_mlp(feature_dim, proj_hidden_dim, proj_out_dim, proj_layers, hidden_bn=proj_hidden_bn)
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=gather_distributed,
                                    feature_transform=build_feature_transform(feature_transform),
                                    base_temperature=base_temperature)

    @property
    def feature_transform(self) -> FeatureTransform | None:
        """The loss's FT hook, ``None`` when FT is off."""
        return self.criterion.feature_transform

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        x1, x2 = self._two_views(views)
        if x1.shape == x2.shape:
            z1, z2 = self.projector(self.backbone(torch.cat([x1, x2], dim=0))).chunk(2, dim=0)
        else:  # views of different sizes cannot share a batch
            z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        loss, info = self.criterion(z1, z2)
        return StepOutput(
            loss=loss,
            outputs={"embeddings": z1.detach(), **info},
            parts={"nt_xent": loss.detach()},
        )
