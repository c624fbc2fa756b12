"""BYOL: predict the target network's projection of the other view; no negatives.

Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning", NeurIPS 2020.

The online network is backbone -> projector -> predictor; the target network is an EMA copy of
backbone -> projector (:meth:`BYOL.after_optimizer_step`, only parameters are averaged). The loss is
symmetric and, as in the paper (section 3.1), the *sum* of the two directions:
``L = (2 - 2 cos(p1, sg(z2'))) + (2 - 2 cos(p2, sg(z1')))``, each averaged over the batch, so it lies in
``[0, 8]`` and the paper's learning rates apply unchanged.

Target initialisation (``target_init``): ``"copy"`` (default, the paper's algorithm 1) starts the target as a
copy of the online backbone and projector. ``"independent"`` reproduces ContrastiveCrop's released BYOL
(``DDP_byol_ccrop.py`` builds ``encoder_k`` with a second ``build_model`` call, ``models/byol.py`` gives it
its own projector, and nothing copies the online weights in): the target starts from its own random
initialisation, drawn by ``backbone_factory`` (a fresh backbone of the same architecture) and a fresh
projector, and only the EMA pulls it towards the online network. The recipes that reproduce ContrastiveCrop's
BYOL rows set it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from contrastlab.errors import ConfigError
from contrastlab.methods.base import Method, StepOutput
from contrastlab.models.ema import momentum_copy
from contrastlab.models.heads import build_mlp
from contrastlab.objectives.cosine import BYOLLoss
from contrastlab.registry import register_method

__all__ = ["BYOL", "TARGET_INITS"]

TARGET_INITS = ("copy", "independent")
"""How the target network starts: a copy of the online one, or its own random initialisation."""


@register_method()
class BYOL(Method):
    """BYOL with an EMA target network.

    Args:
        backbone: feature extractor ``[B, 3, H, W] -> [B, feature_dim]``.
        feature_dim: its output dimension.
        proj_hidden_dim: hidden width of the projector.
        proj_out_dim: output dimension of the projector and of the predictor.
        pred_hidden_dim: hidden width of the predictor.
        target_init: ``"copy"`` (the target starts as the online network) or ``"independent"`` (its own random
            initialisation, ContrastiveCrop's released BYOL).
        backbone_factory: builds a fresh backbone of the online one's architecture; needed by
            ``target_init="independent"`` (:func:`contrastlab.assemble.method` passes it).

    Raises:
        ConfigError: an unknown ``target_init``, or ``"independent"`` without a ``backbone_factory``.

    Attributes:
        projector: online projector (Linear-BN-ReLU-Linear).
        predictor: online predictor (same shape, ``proj_out_dim -> proj_out_dim``).
        target_encoder: ``nn.Sequential(target backbone, target projector)``, no gradient.

    Example:
        >>> from contrastlab.models import build_backbone
        >>> net, dim = build_backbone("resnet20", width=0.25)
        >>> method = BYOL(net, dim, proj_hidden_dim=32, proj_out_dim=16, pred_hidden_dim=32)
        >>> out = method([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)], None, None)
        >>> method.after_optimizer_step(0.99)
    """

    name = "byol"
    momentum_backbone = "target_encoder.0"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        proj_hidden_dim: int = 4096,
        proj_out_dim: int = 256,
        pred_hidden_dim: int = 4096,
        target_init: str = "copy",
        backbone_factory: Callable[[], nn.Module] | None = None,
    ) -> None:
        super().__init__(backbone, feature_dim)
        if target_init not in TARGET_INITS:
            raise ConfigError(f"method.target_init must be one of {', '.join(TARGET_INITS)}, got {target_init!r}")
        self.projector = build_mlp(feature_dim, proj_hidden_dim, proj_out_dim, 2)
        self.predictor = build_mlp(proj_out_dim, pred_hidden_dim, proj_out_dim, 2)
        if target_init == "copy":
            target = nn.Sequential(momentum_copy(backbone), momentum_copy(self.projector))
        else:
            if backbone_factory is None:
                raise ConfigError("method.target_init=independent builds the target from a fresh backbone: pass "
                                  "backbone_factory (contrastlab.assemble.method does)")
            target = nn.Sequential(backbone_factory(), build_mlp(feature_dim, proj_hidden_dim, proj_out_dim, 2))
            for p in target.parameters():
                p.requires_grad_(False)
        self.target_encoder = target
        self.criterion = BYOLLoss()

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.target_encoder[0]), (self.projector, self.target_encoder[1])]

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        x1, x2 = self._two_views(views)
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1, t2 = self.target_encoder(x1), self.target_encoder(x2)
        loss_12 = self.criterion(p1, t2)
        loss_21 = self.criterion(p2, t1)
        loss = loss_12 + loss_21
        return StepOutput(
            loss=loss,
            outputs={"embeddings": z1.detach()},
            parts={"byol_12": loss_12.detach(), "byol_21": loss_21.detach()},
        )
