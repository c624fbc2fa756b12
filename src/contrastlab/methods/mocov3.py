"""MoCo v3: a predictor on the query encoder, keys from a momentum encoder, negatives from the same batch.

Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021.

The online network is backbone -> projector -> predictor; the momentum network is an EMA copy of
backbone -> projector. For two views ``x1, x2``:
``L = ctr(q1, k2) + ctr(q2, k1)`` with :class:`~contrastlab.objectives.batch_info_nce.BatchInfoNCELoss`
(keys gathered from every rank, positive at the global index, scaled by ``2 * tau``). There is no queue.

Heads (all Linears bias-free, as released):

- ``head="resnet"``: projector ``D -> 4096 -> 256`` (Linear-BN-ReLU-Linear-BN, the last BN without
  affine), predictor ``256 -> 4096 -> 256`` without a last BN;
- ``head="vit"``: projector with 3 Linears (two hidden Linear-BN-ReLU), last BN without affine, predictor
  ``256 -> 4096 -> 256`` that keeps its last BN (without affine).

``head="auto"`` picks ``vit`` for the ViTs of :mod:`contrastlab.models.vit` and ``resnet`` otherwise.

**Momentum.** Upstream moves the momentum encoder at the start of each forward, with the momentum of that
iteration (``moco_m_cos``: ``1 - (1 - m) * (1 + cos(pi * t / T)) / 2`` over fractional epochs), then
computes the keys. Here :meth:`Method.after_optimizer_step` moves it right after step ``t - 1``'s optimiser
step with the momentum of step ``t`` (the trainer's ``train.ema_schedule=cosine``), which is the same
sequence of momentum encoders: upstream's first update, before any optimiser step, averages two
identical copies.

**Feature Transformation.** ``feature_transform`` (FT options, or ``None``) puts FT into both loss terms
(:mod:`contrastlab.objectives.batch_info_nce` says how it maps onto in-batch negatives).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from contrastlab.errors import ConfigError
from contrastlab.methods.base import Method, StepOutput
from contrastlab.models.ema import momentum_copy
from contrastlab.models.heads import build_mlp
from contrastlab.objectives.batch_info_nce import BatchInfoNCELoss
from contrastlab.objectives.feature_transform import FeatureTransform, build_feature_transform
from contrastlab.registry import register_method

__all__ = ["MoCoV3", "is_vit"]

HEADS = ("auto", "resnet", "vit")


def is_vit(backbone: nn.Module) -> bool:
    """Whether ``backbone`` is a Vision Transformer (timm's, as :func:`contrastlab.models.vit.build_vit` builds)."""
    return type(backbone).__name__ == "VisionTransformer" or hasattr(backbone, "cls_token")


@register_method()
class MoCoV3(Method):
    """MoCo v3 with a momentum encoder and a predictor, contrasting within the global batch.

    Args:
        backbone: feature extractor ``[B, 3, H, W] -> [B, feature_dim]``.
        feature_dim: its output dimension.
        head: ``resnet``, ``vit`` or ``auto`` (by backbone type): the projector / predictor shapes above.
        proj_hidden_dim: hidden width of projector and predictor (``--moco-mlp-dim``, 4096).
        proj_out_dim: embedding dimension (``--moco-dim``, 256).
        temperature: ``tau`` (``--moco-t``: 1.0 for ResNet, 0.2 for ViT).
        feature_transform: FT options (keys of :class:`FeatureTransform`; ``{}`` gives the published
            setting) or ``None`` (off).

    Attributes:
        projector, predictor: the online heads.
        key_encoder: ``nn.Sequential(momentum backbone, momentum projector)``, no gradient.

    Example:
        >>> from contrastlab.models import build_backbone
        >>> net, dim = build_backbone("resnet20", width=0.25)
        >>> method = MoCoV3(net, dim, proj_hidden_dim=32, proj_out_dim=16)
        >>> out = method([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)], None, None)
        >>> out.outputs["neg_logits"].shape
        torch.Size([8, 3])
    """

    name = "mocov3"
    momentum_backbone = "key_encoder.0"
    min_batch_per_rank = 2
    min_batch_reason = "a query's negatives are the keys of the batch's other images"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        head: Literal["auto", "resnet", "vit"] = "auto",
        proj_hidden_dim: int = 4096,
        proj_out_dim: int = 256,
        temperature: float = 1.0,
        feature_transform: dict[str, Any] | FeatureTransform | None = None,
    ) -> None:
        super().__init__(backbone, feature_dim)
        if head not in HEADS:
            raise ConfigError(f"method.head must be one of {', '.join(HEADS)}, got {head!r}")
        self.head = ("vit" if is_vit(backbone) else "resnet") if head == "auto" else head
        vit = self.head == "vit"
        self.projector = build_mlp(feature_dim, proj_hidden_dim, proj_out_dim, 3 if vit else 2,
                                   last_bn=True, last_bn_affine=False, bias=False)
        self.predictor = build_mlp(proj_out_dim, proj_hidden_dim, proj_out_dim, 2,
                                   last_bn=vit, last_bn_affine=False, bias=False)
        self.key_encoder = nn.Sequential(momentum_copy(backbone), momentum_copy(self.projector))
        self.criterion = BatchInfoNCELoss(temperature=temperature,
                                          feature_transform=build_feature_transform(feature_transform))

    @property
    def feature_transform(self) -> FeatureTransform | None:
        """The loss's FT hook, ``None`` when FT is off."""
        return self.criterion.feature_transform

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.key_encoder[0]), (self.projector, self.key_encoder[1])]

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        x1, x2 = self._two_views(views)
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            k1, k2 = self.key_encoder(x1), self.key_encoder(x2)
        loss_12, info_12 = self.criterion(q1, k2)
        loss_21, info_21 = self.criterion(q2, k1)
        logits = {name: torch.cat([info_12[name], info_21[name]]) for name in info_12}
        return StepOutput(
            loss=loss_12 + loss_21,
            outputs={"embeddings": z1.detach(), **logits},
            parts={"ctr_12": loss_12.detach(), "ctr_21": loss_21.detach()},
        )
