"""MoCo v1 and v2: a query encoder contrasted against a momentum key encoder and a queue of old keys.

He, Fan, Wu, Xie, Girshick, "Momentum Contrast for Unsupervised Visual Representation Learning",
CVPR 2020 (v1: linear fc, temperature 0.07); Chen, Fan, Girshick, He, "Improved Baselines with Momentum
Contrastive Learning", 2020 (v2: 2-layer MLP head, temperature 0.2).

One step, as in the reference ``moco/builder.py``:

1. ``q = normalize(projector(backbone(views[0])))`` (the online, "query" encoder);
2. ``k = normalize(key_encoder(views[1]))`` without gradient, with shuffle-BN (below);
3. InfoNCE of ``q`` against ``k`` and the queue, label 0;
4. the keys are gathered from every rank and written into the queue, *after* the loss.

With ``symmetric=True`` the roles of the views are also swapped, the two losses are averaged, and the
keys of ``views[0]`` then of ``views[1]`` are enqueued (upstream CIFAR demo order: ``cat([k1, k2])``
per rank, then gathered, so a step writes ``2 * global batch`` keys).

**Momentum update.** Upstream updates the key encoder at the start of each forward; here
:meth:`MoCo.after_optimizer_step` does it right after the optimiser step. The sequence of key encoders
used by the forwards is the same (upstream's first update, before any step, moves nothing because the
key encoder starts as a copy). Only parameters are averaged; the key encoder's BatchNorm running
statistics come from its own forward passes.

**Shuffle-BN.** With ``shuffle_bn=True`` and more than one rank, the key encoder's inputs are gathered,
permuted by a random permutation drawn on rank 0 and broadcast, each rank encodes its slice, and the keys
are gathered and un-permuted, so BatchNorm statistics of the key encoder never mix a query's own
sub-batch (section 3.3 of the paper). In a single process it is a no-op: there is nothing to shuffle
across. The alternative, SyncBatchNorm, is the trainer's job (convert the model and leave
``shuffle_bn=False``).

**Feature Transformation.** ``feature_transform`` (a mapping of
:class:`~contrastlab.objectives.feature_transform.FeatureTransform` options, or ``None``) puts FT
(Zhu et al., ICCV 2021) between the normalised ``q, k`` and the logits, upstream's placement: in its
memory module, after the L2-normalising head and before the logits. The queue is read, never modified by
FT, and still receives the raw keys. ``outputs`` then also hold ``pos_logits_raw`` / ``neg_logits_raw``
(before FT), and :meth:`Method.set_progress` tells FT the epoch (its ``start_epoch``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from contrastlab.engine.distributed import broadcast_, gather_no_grad, get_rank, get_world_size
from contrastlab.memory.queue import FeatureQueue
from contrastlab.methods.base import Method, StepOutput
from contrastlab.models.ema import momentum_copy
from contrastlab.models.heads import build_mlp
from contrastlab.objectives.feature_transform import FeatureTransform, build_feature_transform
from contrastlab.objectives.info_nce import InfoNCELoss
from contrastlab.registry import register_method

__all__ = ["MoCo", "shuffled_across_ranks"]

T = TypeVar("T", torch.Tensor, list[torch.Tensor])


def shuffled_across_ranks(encoder: Callable[[torch.Tensor], T]) -> Callable[[torch.Tensor], T]:
    """``encoder`` run with MoCo's batch shuffle (shuffle-BN, He et al. 2020, section 3.3), without gradient.

    The inputs of all ranks are gathered and permuted by a permutation drawn on rank 0; each rank encodes
    its slice, and the outputs are gathered and un-permuted, so each rank gets the outputs of its own
    inputs, computed with BatchNorm statistics of a random sub-batch. ``encoder`` may return a tensor or
    a list of tensors (one per peer of a cohort). In a single process this is ``encoder`` itself.
    """
    world_size = get_world_size()
    if world_size == 1:
        return encoder

    @torch.no_grad()
    def encode(x: torch.Tensor) -> T:
        x_all = gather_no_grad(x)
        perm = broadcast_(torch.randperm(x_all.shape[0], device=x.device), src=0)
        rank = get_rank()
        out = encoder(x_all[perm.view(world_size, -1)[rank]])
        inverse = torch.argsort(perm).view(world_size, -1)[rank]

        def unshuffle(y: torch.Tensor) -> torch.Tensor:
            return gather_no_grad(y)[inverse]  # row i of the gathered outputs belongs to x_all[perm[i]]

        return [unshuffle(y) for y in out] if isinstance(out, list) else unshuffle(out)  # type: ignore[return-value]

    return encode


@register_method()
class MoCo(Method):
    """MoCo v1/v2 with a momentum key encoder and a queue of negatives.

    Args:
        backbone: feature extractor ``[B, 3, H, W] -> [B, feature_dim]``.
        feature_dim: its output dimension.
        proj_hidden_dim: hidden width of the projector (v2's MLP head).
        proj_out_dim: embedding dimension (and queue dimension).
        proj_layers: 2 for v2's MLP head, 1 for v1's linear fc.
        proj_hidden_bn: BatchNorm after the projector's hidden Linear (default); ``False`` gives the released
            MoCo v2 head ``Linear-ReLU-Linear`` with biases (facebookresearch/moco, ContrastiveCrop, FT), which
            ``contrastlab import`` needs for those projects' checkpoints.
        queue_size: number of negatives; a multiple of the keys written per step (global batch, twice
            that when symmetric).
        temperature: InfoNCE temperature (v1: 0.07, v2: 0.2).
        symmetric: also contrast ``views[1]`` queries against ``views[0]`` keys; losses averaged.
        shuffle_bn: batch shuffle across ranks for the key encoder (no-op in a single process).
        gather_distributed: gather keys across ranks before enqueueing (every rank keeps the same queue).
        feature_transform: FT options (keys of :class:`FeatureTransform`, e.g. ``{"target": "posneg",
            "pos_alpha": 2.0, "neg_alpha": 1.6}``; ``{}`` gives the published setting) or ``None`` (off).

    Attributes:
        projector: online projection head.
        key_encoder: ``nn.Sequential(key backbone, key projector)``, no gradient.
        queue: :class:`~contrastlab.memory.FeatureQueue` of ``[queue_size, proj_out_dim]``.

    Example:
        >>> from contrastlab.models import build_backbone
        >>> net, dim = build_backbone("resnet20", width=0.25)
        >>> method = MoCo(net, dim, proj_hidden_dim=32, proj_out_dim=16, queue_size=64)
        >>> out = method([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)], None, None)
        >>> out.outputs["neg_logits"].shape
        torch.Size([4, 64])
    """

    name = "moco"
    momentum_backbone = "key_encoder.0"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        proj_hidden_dim: int = 2048,
        proj_out_dim: int = 128,
        proj_layers: int = 2,
        queue_size: int = 65536,
        temperature: float = 0.2,
        symmetric: bool = False,
        shuffle_bn: bool = True,
        gather_distributed: bool = True,
        feature_transform: dict[str, Any] | FeatureTransform | None = None,
        proj_hidden_bn: bool = True,
    ) -> None:
        super().__init__(backbone, feature_dim)
        self.projector = build_mlp(feature_dim, proj_hidden_dim, proj_out_dim, proj_layers, hidden_bn=proj_hidden_bn)
        self.key_encoder = nn.Sequential(momentum_copy(backbone), momentum_copy(self.projector))
        self.queue = FeatureQueue(proj_out_dim, queue_size)
        self.criterion = InfoNCELoss(temperature=temperature,
                                     feature_transform=build_feature_transform(feature_transform))
        self.symmetric = symmetric
        self.shuffle_bn = shuffle_bn
        self.gather_distributed = gather_distributed

    @property
    def feature_transform(self) -> FeatureTransform | None:
        """The loss's FT hook, ``None`` when FT is off."""
        return self.criterion.feature_transform

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.key_encoder[0]), (self.projector, self.key_encoder[1])]

    def ddp_ignored_buffers(self) -> list[str]:
        return ["queue.queue", "queue.ptr"]  # identical on every rank: keys are gathered before enqueueing

    @torch.no_grad()
    def compute_keys(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised keys of ``x`` from the key encoder, with shuffle-BN across ranks if enabled."""
        encode = shuffled_across_ranks(self.key_encoder) if self.shuffle_bn else self.key_encoder
        return F.normalize(encode(x), dim=1)

    def _contrast(
        self, x_query: torch.Tensor, x_key: torch.Tensor, negatives: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        z = self.projector(self.backbone(x_query))
        k = self.compute_keys(x_key)
        loss, info = self.criterion(z, k, negatives)
        return loss, info, z, k

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        x1, x2 = self._two_views(views)
        negatives = self.queue.queue.clone()  # the queue as it was before this step's keys
        loss, info, z1, k2 = self._contrast(x1, x2, negatives)
        parts = {"info_nce": loss.detach()}
        names = [n for n in ("pos_logits", "neg_logits", "pos_logits_raw", "neg_logits_raw") if n in info]
        scores = {n: info[n] for n in names}
        if self.symmetric:
            loss_21, info_21, _, k1 = self._contrast(x2, x1, negatives)
            parts = {"info_nce_12": loss.detach(), "info_nce_21": loss_21.detach()}
            loss = 0.5 * (loss + loss_21)
            scores = {n: torch.cat([scores[n], info_21[n]]) for n in names}
            keys = torch.cat([k1, k2], dim=0)
        else:
            keys = k2
        self.queue.enqueue(keys, gather_distributed=self.gather_distributed)
        return StepOutput(
            loss=loss,
            outputs={"embeddings": z1.detach(), "keys": keys, **scores},
            parts=parts,
        )
