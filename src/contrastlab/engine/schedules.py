"""Schedules: learning rate (warm-up + cosine / step / constant) and EMA momentum, their shapes registered by name.

Per iteration by default (:func:`learning_rate`, :func:`ema_momentum` of the global step); with
``train.schedule_unit=epoch`` the trainer holds each value for a whole epoch (:func:`epoch_learning_rate`,
and :func:`ema_momentum` at the epoch's first step), as CaCo's released code does. All are pure
functions of the position in training, so a resumed run recomputes them exactly.
"""

from __future__ import annotations

import math
from typing import Any

from contrastlab.registry import (
    LR_SCHEDULES,
    MOMENTUM_SCHEDULES,
    register_lr_schedule,
    register_momentum_schedule,
)


@register_lr_schedule("constant")
def constant(progress: float, passed: int, *, base: float, final: float, gamma: float) -> float:
    """The peak rate throughout."""
    return base


@register_lr_schedule("step")
def step_decay(progress: float, passed: int, *, base: float, final: float, gamma: float) -> float:
    """The peak rate times ``gamma`` per milestone passed (He et al. 2016)."""
    return base * gamma**passed


@register_lr_schedule("cosine")
def cosine(progress: float, passed: int, *, base: float, final: float, gamma: float) -> float:
    """Half a cosine from the peak rate to ``final`` (Loshchilov & Hutter 2017, no restarts)."""
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))


@register_momentum_schedule("constant")
def constant_momentum(progress: float, *, base: float) -> float:
    """The base momentum throughout."""
    return base


@register_momentum_schedule("cosine")
def cosine_momentum(progress: float, *, base: float) -> float:
    """BYOL's cosine increase from ``base`` to 1 (Grill et al. 2020)."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def learning_rate(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    warmup_start_lr: float = 0.0,
    final_lr: float = 0.0,
    milestones_steps: tuple[int, ...] = (),
    gamma: float = 0.1,
) -> float:
    """Learning rate at ``step`` (0-based, before that step's update).

    Warm-up rises linearly from ``warmup_start_lr`` to ``base_lr`` over ``warmup_steps`` (Goyal et al. 2017).
    Cosine then decays to ``final_lr`` at ``total_steps`` (Loshchilov & Hutter 2017, no restarts);
    step multiplies by ``gamma`` at each milestone; constant keeps ``base_lr``.
    """
    shape = LR_SCHEDULES[schedule]
    if step < warmup_steps:
        return warmup_start_lr + (base_lr - warmup_start_lr) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    passed = sum(1 for m in milestones_steps if step >= m)
    return shape(progress, passed, base=base_lr, final=final_lr, gamma=gamma)


def epoch_learning_rate(
    epoch: int,
    *,
    base_lr: float,
    total_epochs: int,
    warmup_epochs: float = 0.0,
    schedule: str = "cosine",
    final_lr: float = 0.0,
    milestones: tuple[int, ...] = (),
    gamma: float = 0.1,
) -> float:
    """Learning rate held for all of epoch ``epoch`` (0-based): schedules that change once per epoch.

    As CaCo's released ``adjust_learning_rate2``: warm-up gives ``base_lr * (epoch + 1) / warmup_epochs``
    (so the first epoch does not train at rate 0), then cosine from ``base_lr`` to ``final_lr`` over the
    remaining ``total_epochs - warmup_epochs`` epochs; step multiplies by ``gamma`` at each milestone
    epoch; constant keeps ``base_lr``.
    """
    shape = LR_SCHEDULES[schedule]
    if epoch < warmup_epochs:
        return base_lr * (epoch + 1) / warmup_epochs
    progress = min(1.0, (epoch - warmup_epochs) / max(1e-12, total_epochs - warmup_epochs))
    passed = sum(1 for m in milestones if epoch >= m)
    return shape(progress, passed, base=base_lr, final=final_lr, gamma=gamma)


def run_learning_rate(cfg: Any, derived: Any, epoch: int, step: int) -> float:
    """A run's rate at ``step`` of ``epoch``: ``optim.*`` scheduled per step, or held per epoch with
    ``train.schedule_unit=epoch``; ``derived`` gives the scaled rates and the step counts
    (:class:`~contrastlab.config.derived.Derived`)."""
    o, d = cfg.optim, derived
    if cfg.train.schedule_unit == "epoch":
        return epoch_learning_rate(epoch, base_lr=d.lr, total_epochs=cfg.train.epochs, warmup_epochs=o.warmup_epochs,
                                   schedule=o.schedule, final_lr=d.final_lr, milestones=tuple(o.milestones),
                                   gamma=o.gamma)
    return learning_rate(step, base_lr=d.lr, total_steps=d.total_steps, warmup_steps=d.warmup_steps,
                         schedule=o.schedule, warmup_start_lr=d.warmup_start_lr, final_lr=d.final_lr,
                         milestones_steps=tuple(m * d.steps_per_epoch for m in o.milestones), gamma=o.gamma)


def run_weight_decay(cfg: Any, derived: Any, step: int) -> float:
    """A run's weight decay at ``step``: a half cosine from ``optim.weight_decay`` to ``optim.weight_decay_end`` over
    the run's steps (DINO's ``cosine_scheduler(weight_decay, weight_decay_end, epochs, steps_per_epoch)``, Caron et
    al. 2021), or ``optim.weight_decay`` when no end is set."""
    start, end = cfg.optim.weight_decay, cfg.optim.weight_decay_end
    if end is None:
        return start
    progress = min(1.0, step / max(1, derived.total_steps))  # upstream: the iteration over the number of them
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def ema_momentum(step: int, *, base: float, total_steps: int, schedule: str = "constant") -> float:
    """EMA momentum at ``step``: constant, or BYOL's cosine increase from ``base`` to 1 (Grill et al. 2020)."""
    return MOMENTUM_SCHEDULES[schedule](min(1.0, step / max(1, total_steps)), base=base)
