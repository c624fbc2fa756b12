"""Supervised baseline: cross-entropy of a linear classifier on the backbone features of ``views[0]``.

The reference point every self-supervised recipe is compared with (and MCL's supervised setting builds
on it). Labels must be class indices ``>= 0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contrastlab.errors import ConfigError
from contrastlab.methods.base import Method, StepOutput
from contrastlab.registry import register_method

__all__ = ["Supervised"]


@register_method()
class Supervised(Method):
    """Backbone + linear classifier trained with cross-entropy on the first view.

    Args:
        backbone: feature extractor ``[B, 3, H, W] -> [B, feature_dim]``.
        feature_dim: its output dimension.
        num_classes: number of classes.

    Example:
        >>> from contrastlab.models import build_backbone
        >>> net, dim = build_backbone("resnet20", width=0.25)
        >>> method = Supervised(net, dim, num_classes=10)
        >>> out = method([torch.randn(4, 3, 16, 16)], torch.tensor([0, 1, 2, 3]), None)
        >>> out.outputs["logits"].shape
        torch.Size([4, 10])
    """

    name = "supervised"

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__(backbone, feature_dim)
        if num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
        self.classifier = nn.Linear(feature_dim, num_classes)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"classifier": self.classifier(self.backbone(x))}

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        if not views:
            raise ConfigError("method 'supervised' needs at least 1 view per image, got 0")
        features = self.backbone(views[0])
        logits = self.classifier(features)
        loss = F.cross_entropy(logits, labels)
        return StepOutput(
            loss=loss,
            outputs={"embeddings": features.detach(), "logits": logits.detach()},
            parts={"cross_entropy": loss.detach()},
        )
