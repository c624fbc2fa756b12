"""DINO's self-distillation loss: cross-entropy from a centred, sharpened teacher to every student crop.

Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin, "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021 (equations (1)-(4)); released as ``DINOLoss`` in ``main_dino.py`` of
github.com/facebookresearch/dino.

For the student's outputs ``s_v`` (crops ``v = 0 .. V-1``, the ``G`` global crops first) and the teacher's
outputs ``t_i`` on the global crops (``i = 0 .. G-1``, the same images as student crops ``0 .. G-1``):

- teacher targets ``P_t(i) = softmax((t_i - c) / tau_t)`` (centring by ``c``, sharpening by a low ``tau_t``);
- student predictions ``log P_s(v) = log_softmax(s_v / tau_s)``;
- ``L = mean over the pairs (i, v), v != i, of mean_b H(P_t(i)_b, P_s(v)_b)``, ``H(p, q) = -sum_k p_k log q_k``:
  ``G * V - G`` pairs (a crop is never compared with itself);
- afterwards the centre moves towards the mean teacher output of the batch, over every rank as released (an
  all-reduce): ``c <- m c + (1 - m) mean_{i, b} t_i[b]``, with the centre of *before* the step used in ``L``.

The teacher temperature follows :func:`teacher_temperature` (a linear warm-up per epoch, as released); the method
passes the current value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from contrastlab.engine.distributed import all_reduce_mean

__all__ = ["DINOLoss", "teacher_temperature"]


def teacher_temperature(epoch: float, *, warmup_temperature: float, temperature: float,
                        warmup_epochs: int) -> float:
    """DINO's teacher temperature in epoch ``floor(epoch)`` (0-based), held for the whole epoch as released.

    Upstream builds ``np.linspace(warmup_temperature, temperature, warmup_epochs)`` followed by ``temperature``:
    the warm-up ends *at* ``temperature`` in epoch ``warmup_epochs - 1`` (endpoint included), so epoch ``e`` of the
    warm-up has ``warmup + (temperature - warmup) * e / (warmup_epochs - 1)``; one warm-up epoch gives
    ``warmup_temperature`` in epoch 0; none gives ``temperature`` throughout.

    Example:
        >>> round(teacher_temperature(15, warmup_temperature=0.04, temperature=0.07, warmup_epochs=31), 6)
        0.055
    """
    e = math.floor(epoch)
    if e >= warmup_epochs:
        return temperature
    if warmup_epochs == 1:
        return warmup_temperature
    return warmup_temperature + (temperature - warmup_temperature) * e / (warmup_epochs - 1)


class DINOLoss(nn.Module):
    """DINO's loss with its momentum centre (see the module docstring).

    Args:
        out_dim: ``K``, the width of the head's output (upstream ``--out_dim``, 65536).
        student_temperature: ``tau_s`` (0.1).
        center_momentum: ``m`` of the centre (0.9).
        gather_distributed: average the batch centre over the ranks (upstream's all-reduce), so every rank keeps the
            centre of the global batch; ``False`` keeps each rank's own.

    Attributes:
        center: buffer ``[1, K]``, the centre ``c`` (zeros at the start, as released).

    Example:
        >>> loss_fn = DINOLoss(out_dim=16)
        >>> student = [torch.randn(4, 16) for _ in range(4)]  # 2 global + 2 local crops
        >>> teacher = [torch.randn(4, 16) for _ in range(2)]
        >>> loss, info = loss_fn(student, teacher, teacher_temperature=0.04)
        >>> info["pair_losses"].shape  # [teacher crops, student crops]; the diagonal pairs are skipped
        torch.Size([2, 4])
    """

    def __init__(self, out_dim: int, student_temperature: float = 0.1, center_momentum: float = 0.9,
                 gather_distributed: bool = True) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"out_dim must be positive, got {out_dim}")
        if student_temperature <= 0:
            raise ValueError(f"student_temperature must be positive, got {student_temperature}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.student_temperature = student_temperature
        self.center_momentum = center_momentum
        self.gather_distributed = gather_distributed
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], teacher_temperature: float,
                update_center: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss over every pair of a teacher crop and another student crop, then the centre's update.

        Args:
            student: ``V`` tensors ``[B, K]``, the student's outputs per crop, global crops first.
            teacher: ``G <= V`` tensors ``[B, K]``, the teacher's outputs on the global crops (no gradient flows
                into them); teacher crop ``i`` shows the image of student crop ``i``.
            teacher_temperature: ``tau_t`` of this step.
            update_center: move the centre afterwards (upstream always does).

        Returns:
            ``(loss, info)``; ``info`` holds, detached: ``pair_losses [G, V]`` (the mean cross-entropy of each pair,
            0 where skipped), ``teacher_entropy`` (mean entropy of the teacher's targets) and ``batch_center [1, K]``
            (the mean teacher output the centre moved towards, over ranks when ``gather_distributed``).
        """
        num_teacher, num_student = len(teacher), len(student)
        if num_teacher < 1 or num_student < num_teacher:
            raise ValueError(f"DINO needs 1 <= teacher crops <= student crops, got {num_teacher} and {num_student}")
        if teacher_temperature <= 0:
            raise ValueError(f"teacher_temperature must be positive, got {teacher_temperature}")
        dtype = torch.promote_types(student[0].dtype, torch.float32)  # bf16/fp16 outputs: the softmaxes in fp32
        with torch.autocast(student[0].device.type, enabled=False):
            batch, width = teacher[0].shape
            t = torch.cat([x.detach().to(dtype) for x in teacher])  # [G * B, K], crop after crop
            targets = F.softmax((t - self.center.to(dtype)) / teacher_temperature, dim=-1)
            log_probs = F.log_softmax(torch.cat([x.to(dtype) for x in student]) / self.student_temperature, dim=-1)
            pair_losses = -torch.einsum("gbk,vbk->gv", targets.reshape(num_teacher, batch, width),
                                        log_probs.reshape(num_student, batch, width)) / batch  # [G, V]
            keep = ~torch.eye(num_teacher, num_student, dtype=torch.bool, device=pair_losses.device)
            loss = (pair_losses * keep).sum() / (num_teacher * num_student - num_teacher)  # no mask: no host sync
            entropy = -(targets * targets.clamp_min(1e-30).log()).sum(-1).mean()
            batch_center = t.mean(0, keepdim=True)
            if self.gather_distributed:
                batch_center = all_reduce_mean(batch_center)
        if update_center:
            self.update_center(batch_center)
        info = {"pair_losses": (pair_losses * keep).detach(), "teacher_entropy": entropy.detach(),
                "batch_center": batch_center.detach()}
        return loss, info

    @torch.no_grad()
    def update_center(self, batch_center: torch.Tensor) -> None:
        """``c <- m c + (1 - m) batch_center`` in place (``batch_center`` already averaged over ranks)."""
        self.center.mul_(self.center_momentum).add_(batch_center.to(self.center.dtype), alpha=1 - self.center_momentum)
