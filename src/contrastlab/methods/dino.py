"""DINO: self-distillation with no labels, a student matching a momentum teacher's centred, sharpened outputs.

Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin, "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021. Behaviour follows the released code (github.com/facebookresearch/dino, ``main_dino.py``,
``vision_transformer.py``, ``utils.py``).

One step (``train_one_epoch`` upstream), for ``V`` crops of which the first ``G = 2`` are the global ones:

1. the student (``backbone`` -> :class:`~contrastlab.models.dino_head.DINOHead`) sees every crop, the teacher
   (``teacher_backbone`` -> ``teacher_head``, an EMA copy) only the global crops; each backbone runs once per group
   of same-sized crops (:func:`~contrastlab.models.multicrop.forward_by_resolution`, upstream's
   ``MultiCropWrapper``), and each head once on all of its network's features;
2. :class:`~contrastlab.objectives.dino.DINOLoss`: cross-entropy from the centred teacher at temperature ``tau_t``
   to the student at ``tau_s = 0.1``, averaged over the ``G V - G`` pairs of different crops; then the centre moves
   (momentum 0.9) towards the teacher's mean output over the global batch;
3. backward, per-parameter gradient clipping (``optim.clip_grad`` with ``optim.clip_grad_mode=per_parameter``),
   the last layer's gradients dropped during the first ``freeze_last_layer`` epochs
   (:meth:`DINO.before_optimizer_step`), the optimiser step with the cosine weight decay
   (``optim.weight_decay_end``), then the teacher's EMA with BYOL's cosine momentum to 1
   (``train.ema_schedule=cosine``, :meth:`Method.after_optimizer_step`).

The teacher temperature warms up linearly per epoch (:func:`~contrastlab.objectives.dino.teacher_temperature`,
set in :meth:`DINO.set_progress`). The teacher starts as a copy of the student; its copy of a ViT has no stochastic
depth (upstream builds the teacher without ``drop_path_rate``). Grouping crops by resolution changes what a
BatchNorm sees (ResNet-50): the global crops are normalised together, and so are the local ones, as released.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from contrastlab.errors import ConfigError
from contrastlab.methods.base import Method, StepOutput, capped_sizes
from contrastlab.models.dino_head import DINOHead
from contrastlab.models.ema import momentum_copy
from contrastlab.models.multicrop import forward_by_resolution
from contrastlab.objectives.dino import DINOLoss, teacher_temperature
from contrastlab.registry import register_method

__all__ = ["DINO", "without_drop_path"]


def without_drop_path(module: nn.Module) -> nn.Module:
    """``module`` with every stochastic-depth layer (timm's ``DropPath``, anything with a ``drop_prob``) set to drop
    nothing, in place: DINO's teacher is built without ``drop_path_rate``."""
    for m in module.modules():
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    return module


@register_method()
class DINO(Method):
    """DINO with a momentum teacher, a centred and sharpened target and multi-crop (see the module docstring).

    Args:
        backbone: feature extractor ``[B, 3, H, W] -> [B, feature_dim]`` (the student's).
        feature_dim: its output dimension.
        out_dim: ``K``, the head's output dimension (``--out_dim``, 65536).
        hidden_dim: the head MLP's hidden width (2048).
        bottleneck_dim: the head MLP's output, L2-normalised before the last layer (256).
        head_layers: Linears in the head MLP (3).
        use_bn_in_head: BatchNorm in the head MLP (``--use_bn_in_head``, off).
        norm_last_layer: keep the last layer's rows at norm 1 (``--norm_last_layer``, on; the released ViT-S/16 runs
            turned it off).
        student_temp: ``tau_s`` (0.1).
        teacher_temp: ``tau_t`` after the warm-up (``--teacher_temp``, 0.04).
        warmup_teacher_temp: ``tau_t`` in epoch 0 (``--warmup_teacher_temp``, 0.04).
        warmup_teacher_temp_epochs: epochs of the linear warm-up of ``tau_t`` (``--warmup_teacher_temp_epochs``, 0).
        center_momentum: momentum of the centre (0.9).
        freeze_last_layer: epochs during which the last layer does not move (``--freeze_last_layer``, 1).
        num_global_views: leading crops the teacher sees (2).
        gather_distributed: average the centre's batch mean over ranks (upstream's all-reduce).

    Raises:
        ConfigError: a temperature that is not positive, a momentum outside ``[0, 1]``, negative epochs or fewer than
            one global view.

    Attributes:
        head: the student's :class:`~contrastlab.models.dino_head.DINOHead`.
        teacher_backbone, teacher_head: the teacher, EMA copies without gradients.
        criterion: the :class:`~contrastlab.objectives.dino.DINOLoss` (its ``center`` buffer is the centre).
        current_teacher_temp: ``tau_t`` of the current epoch.

    Example:
        >>> from contrastlab.models import build_backbone
        >>> net, dim = build_backbone("resnet20", width=0.25)
        >>> method = DINO(net, dim, out_dim=32, hidden_dim=16, bottleneck_dim=8)
        >>> views = [torch.randn(4, 3, 16, 16)] * 2 + [torch.randn(4, 3, 8, 8)] * 2
        >>> out = method(views, None, None)
        >>> out.outputs["embeddings"].shape
        torch.Size([4, 8])
    """

    name = "dino"
    momentum_backbone = "teacher_backbone"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_layers: int = 3,
        use_bn_in_head: bool = False,
        norm_last_layer: bool = True,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        center_momentum: float = 0.9,
        freeze_last_layer: int = 1,
        num_global_views: int = 2,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__(backbone, feature_dim)
        for key, value in (("student_temp", student_temp), ("teacher_temp", teacher_temp),
                           ("warmup_teacher_temp", warmup_teacher_temp)):
            if value <= 0:
                raise ConfigError(f"method.{key} must be positive, got {value}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ConfigError(f"method.center_momentum must be in [0, 1], got {center_momentum}")
        for key, value in (("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs),
                           ("freeze_last_layer", freeze_last_layer)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"method.{key} must be a whole number of epochs >= 0, got {value!r}")
        if isinstance(num_global_views, bool) or not isinstance(num_global_views, int) or num_global_views < 1:
            raise ConfigError(f"method.num_global_views must be a positive integer (the crops the teacher sees, 2 "
                              f"as released), got {num_global_views!r}")
        self.head = DINOHead(feature_dim, out_dim=out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                             num_layers=head_layers, use_bn=use_bn_in_head, norm_last_layer=norm_last_layer)
        self.teacher_backbone = without_drop_path(momentum_copy(backbone))
        self.teacher_head = momentum_copy(self.head)
        self.criterion = DINOLoss(out_dim, student_temperature=student_temp, center_momentum=center_momentum,
                                  gather_distributed=gather_distributed)
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.freeze_last_layer = freeze_last_layer
        self.num_global_views = num_global_views
        self.epoch_index = 0  # the current epoch (set_progress); drives tau_t and the frozen last layer
        self.current_teacher_temp = self._temperature(0.0)

    # --- trainer hooks -------------------------------------------------------------------------------

    def _temperature(self, epoch: float) -> float:
        return teacher_temperature(epoch, warmup_temperature=self.warmup_teacher_temp, temperature=self.teacher_temp,
                                   warmup_epochs=self.warmup_teacher_temp_epochs)

    def set_progress(self, epoch: float, total_epochs: int, per_epoch: bool) -> None:
        """The epoch sets ``tau_t`` (per whole epoch, as released) and whether the last layer is frozen."""
        self.epoch_index = math.floor(epoch)
        self.current_teacher_temp = self._temperature(epoch)
        super().set_progress(epoch, total_epochs, per_epoch)

    def before_optimizer_step(self, step: int) -> None:
        """Drop the last layer's gradients while ``epoch < freeze_last_layer`` (upstream
        ``cancel_gradients_last_layer``): the optimiser leaves it, and its state, untouched."""
        if self.epoch_index < self.freeze_last_layer:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone), (self.head, self.teacher_head)]

    def ddp_ignored_buffers(self) -> list[str]:
        """The centre: every rank moves it by the same all-reduced batch mean, so DDP need not re-broadcast it."""
        return ["criterion.center"]

    def rank_local_buffers(self) -> list[str]:
        """Without ``gather_distributed`` each rank's centre follows its own batches."""
        return [] if self.criterion.gather_distributed else ["criterion.center"]

    # --- the step ------------------------------------------------------------------------------------

    @classmethod
    def smoke_overrides(cls, params: dict[str, Any]) -> list[str]:
        """``--smoke`` trains the head at most 1024 wide in its output and 512 in its MLP (the release's 65536
        outputs make a 2-step CPU run slow and its checkpoint large); the code path is the same."""
        return capped_sizes(params, {"out_dim": 1024, "hidden_dim": 512})

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        num_global = self.num_global_views
        if len(views) < max(2, num_global):
            raise ConfigError(f"method 'dino' compares every crop with the teacher's other global crops: it needs at "
                              f"least {max(2, num_global)} views per image ({num_global} global), got {len(views)}; "
                              "use views.planner=multicrop (or views.num_views=2)")
        z = self.head.project(forward_by_resolution(self.backbone, views))
        student = self.head.prototypes(z).chunk(len(views))
        with torch.no_grad():
            teacher = self.teacher_head(forward_by_resolution(self.teacher_backbone, views[:num_global]))
        loss, info = self.criterion(list(student), list(teacher.chunk(num_global)), self.current_teacher_temp)
        return StepOutput(
            loss=loss,
            outputs={"embeddings": z[: views[0].shape[0]].detach()},
            parts={"dino": loss.detach(), "teacher_entropy": info["teacher_entropy"],
                   "teacher_temp": loss.detach().new_tensor(self.current_teacher_temp)},
        )
