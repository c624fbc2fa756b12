"""Barlow Twins: make the cross-correlation of two views' embeddings the identity; no negatives, no asymmetry.

Zbontar, Jing, Misra, LeCun, Deny, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction", ICML 2021;
released code facebookresearch/barlowtwins, ``main.py``.

Both views go through the same backbone and projector, one view at a time (as the release: BatchNorm statistics
per view). The projector is the release's ``--projector 8192-8192-8192``: ``proj_layers`` bias-free Linears with
BatchNorm and ReLU between them and nothing after the last. The loss is
:class:`~contrastlab.objectives.BarlowTwinsLoss` on the two projections, over the global batch under DDP. The release
has no multi-crop: with more views the first two are used.

The release's optimiser is LARS with the biases and BatchNorm parameters excluded from weight decay and from the
trust ratio and trained at their own rate (``--learning-rate-biases 0.0048`` against ``--learning-rate-weights
0.2``): the default parameter groups (:func:`~contrastlab.methods.base.make_param_groups`) flag the 1-D parameters
``exclude_from_lars``, and ``optim.bias_bn_lr_scale=0.024`` gives their rate. See ``docs/barlow_twins.md``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from contrastlab.methods.base import Method, StepOutput, capped_sizes
from contrastlab.models.heads import build_mlp
from contrastlab.objectives.barlow_twins import BarlowTwinsLoss
from contrastlab.registry import register_method

__all__ = ["SMOKE_WIDTH", "BarlowTwins"]

SMOKE_WIDTH = 512
"""The widest projector a ``--smoke`` run builds (:meth:`BarlowTwins.smoke_overrides`)."""


@register_method()
class BarlowTwins(Method):
    """Barlow Twins with the released projector.

    Args:
        backbone: feature extractor ``[B, 3, H, W] -> [B, feature_dim]``.
        feature_dim: its output dimension.
        proj_hidden_dim: width of the projector's hidden layers (release: 8192).
        proj_out_dim: output dimension of the projector (release: 8192).
        proj_layers: Linear layers in the projector (release: 3).
        lambd: weight of the off-diagonal term (release: 0.0051).
        scale_loss: factor on the loss (release: 1; solo-learn's CIFAR recipes: 0.1).
        gather_distributed: standardise and correlate over the global batch under DDP.

    Example:
        >>> from contrastlab.models import build_backbone
        >>> net, dim = build_backbone("resnet20", width=0.25)
        >>> method = BarlowTwins(net, dim, proj_hidden_dim=32, proj_out_dim=32)
        >>> out = method([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)], None, None)
        >>> sorted(out.parts)
        ['barlow_off_diagonal', 'barlow_on_diagonal']
    """

    name = "barlow_twins"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        proj_hidden_dim: int = 8192,
        proj_out_dim: int = 8192,
        proj_layers: int = 3,
        lambd: float = 0.0051,
        scale_loss: float = 1.0,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__(backbone, feature_dim)
        self.projector = build_mlp(feature_dim, proj_hidden_dim, proj_out_dim, proj_layers, bias=False)
        self.criterion = BarlowTwinsLoss(lambd=lambd, scale=scale_loss, gather_distributed=gather_distributed)

    @classmethod
    def smoke_overrides(cls, params: dict[str, Any]) -> list[str]:
        """``--smoke`` trains the projector at most ``SMOKE_WIDTH`` wide (the release's 8192 makes a 2-step CPU run
        take minutes and write a 1.4 GB checkpoint); the code path is the same."""
        return capped_sizes(params, {"proj_hidden_dim": SMOKE_WIDTH, "proj_out_dim": SMOKE_WIDTH})

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        x1, x2 = self._two_views(views)
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        loss, info = self.criterion(z1, z2)
        return StepOutput(
            loss=loss,
            outputs={"embeddings": z1.detach()},
            parts={"barlow_on_diagonal": info["on_diagonal"], "barlow_off_diagonal": info["off_diagonal"]},
        )
