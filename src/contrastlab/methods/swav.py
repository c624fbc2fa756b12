"""SwAV: online clustering with swapped prediction of Sinkhorn codes over multi-crop views.

Caron, Misra, Mairal, Goyal, Bojanowski, Joulin, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", NeurIPS 2020. Released code: facebookresearch/swav (``main_swav.py``, ``src/resnet50.py``).

One step, as the release's ``train``:

1. the prototypes (:class:`~contrastlab.models.prototypes.Prototypes`, ``K`` rows) are L2-normalised in place,
   without gradient;
2. the views are encoded by resolution groups (consecutive views of the same size go through the backbone as one
   batch, so BatchNorm sees e.g. both 224 crops together and the six 96 crops together), the features of every
   crop go through the projector together (``Linear-BN-ReLU-Linear``, 2048 -> 128), are L2-normalised (``z``) and
   scored against the prototypes (``S = z C^T``, the cosines);
3. for each crop in ``crops_for_assign`` (the two global crops), the codes ``q`` are the Sinkhorn-Knopp solution
   over the global batch (:func:`~contrastlab.objectives.swav.sinkhorn_knopp`; from ``epoch_queue_starts`` on,
   with the queued embeddings' scores placed before the batch's); every other crop predicts them
   (:func:`~contrastlab.objectives.swav.swapped_prediction_loss`, temperature 0.1);
4. after the backward pass, while the step is below ``freeze_prototypes_niters``, the prototypes' gradient is
   dropped (:meth:`SwAV.before_optimizer_step`), so they keep their random initialisation.

**The queue** (used by the release's batch-256 runs). Each rank keeps its own queue of ``queue_length / world``
embeddings per assigned crop (``queue [A, L / W, D]``), newest first: every step shifts it by the rank's batch and
writes the rank's ``z`` of that crop at the front, from the epoch ``epoch_queue_starts`` on. The queue's scores
join the Sinkhorn only once it is in use: as in the release's ``use_the_queue``, a flag cleared at the start of
every epoch and set at the first step whose queue (of the assigned crop being coded, before this step's write)
has a non-zero last row, i.e. once the queue has been filled; within that step and the rest of the epoch the flag
covers every assigned crop. The queue differs from rank to rank (:meth:`SwAV.rank_local_buffers`: each rank's
copy is saved and given back on resume); the flag travels in mid-epoch checkpoints (:meth:`SwAV.random_state`).
``queue_length`` must be a multiple of the global batch (the release silently trims it to one, which is
0 for its batch-4096 runs; here the first step names the value to set).

Precision: the normalisation, the prototype scores, the Sinkhorn and the log-softmax run in at least float32,
outside autocast (the release's apex O1 ran the prototype product in fp16; bf16 keeps about 3 significant digits,
which ``exp(S / 0.05)`` would magnify).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from contrastlab.engine.distributed import get_world_size
from contrastlab.errors import ConfigError
from contrastlab.methods.base import Method, StepOutput
from contrastlab.models.heads import build_mlp
from contrastlab.models.multicrop import forward_by_resolution
from contrastlab.models.prototypes import Prototypes
from contrastlab.objectives.swav import SwAVLoss
from contrastlab.registry import register_method

__all__ = ["SwAV"]


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"method.{name} must be an integer >= 0, got {value!r}")
    return value


@register_method()
class SwAV(Method):
    """SwAV with a projection head, prototypes, multi-crop swapped prediction and the optional queue.

    Args:
        backbone: feature extractor ``[B, 3, H, W] -> [B, feature_dim]``.
        feature_dim: its output dimension.
        proj_hidden_dim: hidden width of the projection head (release ``--hidden_mlp`` 2048; 0: one Linear).
        proj_out_dim: embedding dimension ``D`` (release ``--feat_dim`` 128).
        num_prototypes: number of prototypes ``K`` (release ``--nmb_prototypes`` 3000).
        temperature: of the predictions' softmax (0.1).
        epsilon: Sinkhorn's entropic regularisation (0.05).
        sinkhorn_iterations: Sinkhorn's row/column scalings (3).
        crops_for_assign: the crops whose codes are computed (the global crops ``[0, 1]``).
        freeze_prototypes_niters: optimiser steps during which the prototypes do not move (313: one epoch at
            batch 4096; the release's batch-256 runs use 5005).
        queue_length: embeddings queued per assigned crop over all ranks (0: no queue; the release's batch-256
            runs use 3840).
        epoch_queue_starts: the 0-based epoch from which the queue is filled (15).
        gather_distributed: Sinkhorn over the global batch under DDP (the release's ``distributed_sinkhorn``).

    Example:
        >>> from contrastlab.models import build_backbone
        >>> net, dim = build_backbone("resnet20", width=0.25)
        >>> method = SwAV(net, dim, proj_hidden_dim=32, proj_out_dim=16, num_prototypes=10)
        >>> views = [torch.randn(4, 3, 16, 16)] * 2 + [torch.randn(4, 3, 8, 8)] * 2
        >>> out = method(views, None, None)
        >>> out.outputs["codes"].shape
        torch.Size([2, 4, 10])
    """

    name = "swav"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        proj_hidden_dim: int = 2048,
        proj_out_dim: int = 128,
        num_prototypes: int = 3000,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        crops_for_assign: tuple[int, ...] | list[int] = (0, 1),
        freeze_prototypes_niters: int = 313,
        queue_length: int = 0,
        epoch_queue_starts: int = 15,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__(backbone, feature_dim)
        self.projector = build_mlp(feature_dim, proj_hidden_dim, proj_out_dim, 2 if proj_hidden_dim else 1)
        self.prototypes = Prototypes(proj_out_dim, num_prototypes)
        self.criterion = SwAVLoss(temperature, epsilon, sinkhorn_iterations, crops_for_assign, gather_distributed)
        self.freeze_prototypes_niters = _non_negative_int("freeze_prototypes_niters", freeze_prototypes_niters)
        self.queue_length = _non_negative_int("queue_length", queue_length)
        self.epoch_queue_starts = _non_negative_int("epoch_queue_starts", epoch_queue_starts)
        world = get_world_size()
        if queue_length % world:
            raise ConfigError(f"method.queue_length={queue_length} must be a multiple of the {world} ranks (each "
                              f"keeps queue_length / ranks embeddings); use a multiple of the global batch")
        self.register_buffer("queue", torch.zeros(len(self.criterion.crops_for_assign), queue_length // world,
                                                  proj_out_dim))
        self.progress_epoch = 0.0  # where training stands (set_progress)
        self.queue_in_use = False  # the release's use_the_queue ...
        self.queue_flag_epoch = -1  # ... as it stands in this epoch

    @property
    def crops_for_assign(self) -> list[int]:
        return self.criterion.crops_for_assign

    def ddp_ignored_buffers(self) -> list[str]:
        return ["queue"]  # each rank's own embeddings: DDP must not overwrite them with rank 0's

    def rank_local_buffers(self) -> list[str]:
        return ["queue"]

    def random_state(self) -> dict[str, Any]:
        """SwAV draws no random numbers of its own, but its queue flag (``use_the_queue``) lives within an epoch, as
        the state a mid-epoch checkpoint carries does: saved there, a run resumed mid-epoch continues as it would
        have (at an epoch's end the next epoch clears the flag anyway)."""
        return {**super().random_state(),
                "swav_queue_flag": {"in_use": self.queue_in_use, "epoch": self.queue_flag_epoch}}

    def set_random_state(self, state: dict[str, Any]) -> None:
        super().set_random_state(state)
        flag = state.get("swav_queue_flag")
        if flag is not None:
            self.queue_in_use, self.queue_flag_epoch = bool(flag["in_use"]), int(flag["epoch"])

    def set_progress(self, epoch: float, total_epochs: int, per_epoch: bool) -> None:
        super().set_progress(epoch, total_epochs, per_epoch)
        self.progress_epoch = epoch

    def queue_active(self) -> bool:
        """Whether the queue exists this epoch (``queue_length > 0`` and epoch >= ``epoch_queue_starts``)."""
        return self.queue_length > 0 and math.floor(self.progress_epoch) >= self.epoch_queue_starts

    def before_optimizer_step(self, step: int) -> None:
        """Drop the prototypes' gradient during the first ``freeze_prototypes_niters`` steps (the release)."""
        if step < self.freeze_prototypes_niters:
            self.prototypes.weight.grad = None

    @torch.no_grad()
    def _queue_scores(self, z: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """The queued scores of each assigned crop (``None`` while the queue is not in use), then the queue's write
        of this step's embeddings (main_swav.py's order: read, shift, write)."""
        if not self.queue_active():
            return [None] * len(self.crops_for_assign)
        batch, world = z[0].shape[0], get_world_size()
        if self.queue_length % (batch * world):
            trimmed = self.queue_length - self.queue_length % (batch * world)
            raise ConfigError(f"method.queue_length={self.queue_length} must be a multiple of the global batch "
                              f"({batch} x {world} ranks = {batch * world}); the release trims it to {trimmed}: set "
                              f"method.queue_length={trimmed} (0: no queue)")
        floor_epoch = math.floor(self.progress_epoch)
        if floor_epoch != self.queue_flag_epoch:  # use_the_queue = False at the start of every epoch
            self.queue_in_use, self.queue_flag_epoch = False, floor_epoch
        out: list[torch.Tensor | None] = []
        weight = self.prototypes.weight
        for i, crop in enumerate(self.crops_for_assign):
            queue = self.queue[i]
            if self.queue_in_use or bool(queue[-1].ne(0).any()):
                self.queue_in_use = True
                out.append(queue.to(weight.dtype) @ weight.t())
            else:
                out.append(None)
            queue[batch:] = queue[:-batch].clone()
            queue[:batch] = z[crop]
        return out

    @property
    def logit_temperature(self) -> None:
        """None: SwAV's scores are against prototypes, not a positive and negatives (no score statistics)."""
        return None

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        if len(views) < 2:
            raise ConfigError(f"method 'swav' needs at least 2 views per image (views.num_views, views.num_small), "
                              f"got {len(views)}")
        if max(self.crops_for_assign) >= len(views):
            raise ConfigError(f"method.crops_for_assign={self.crops_for_assign} names crop "
                              f"{max(self.crops_for_assign)}, but each image has {len(views)} views: use indices "
                              f"below {len(views)} (the global views come first)")
        self.prototypes.normalize_()
        projected = self.projector(forward_by_resolution(self.backbone, views))
        weight = self.prototypes.weight
        with torch.autocast(projected.device.type, enabled=False):
            z = F.normalize(projected.to(weight.dtype), dim=1)
            scores = self.prototypes(z)
        batch = views[0].shape[0]
        z_crops = list(z.detach().split(batch))
        queued = self._queue_scores(z_crops)
        loss, info = self.criterion(list(scores.split(batch)), queued)
        used = any(q is not None for q in queued)
        return StepOutput(
            loss=loss,
            outputs={"embeddings": projected[:batch].detach(), "codes": info["codes"]},
            parts={"swav": loss.detach(), "queue_used": torch.tensor(float(used), device=loss.device)},
        )
