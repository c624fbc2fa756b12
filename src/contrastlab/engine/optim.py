"""Optimisers: SGD, AdamW, LARS with MoCo v3's rules, and LARC; registered by name (``optim.name``).

LARS (You et al. 2017) as used by MoCo v3 (Chen et al. 2021) and BYOL: the trust ratio
``eta * ||w|| / ||g + wd * w||`` scales each update, and neither weight decay nor the trust ratio
applies to 1-D parameters (biases and normalisation weights), which parameter groups flag with
``exclude_from_lars``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from contrastlab.config.schema import OptimConfig
from contrastlab.registry import OPTIMIZERS as _OPTIMIZERS
from contrastlab.registry import register_optimizer

OPTIMIZERS = _OPTIMIZERS
"""Optimiser registry (:data:`contrastlab.registry.OPTIMIZERS`): name -> builder ``(param_groups, settings, lr)``,
``settings`` an :class:`~contrastlab.config.schema.OptimConfig`. Users add theirs with
:func:`contrastlab.register_optimizer`."""


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling.

    Args:
        params: parameters or groups; a group with ``exclude_from_lars=True`` gets plain SGD with
            momentum and no weight decay.
        lr: learning rate.
        weight_decay: L2 penalty added to the gradient before the trust ratio.
        momentum: heavy-ball momentum.
        trust_coefficient: ``eta`` in the trust ratio.
        clip_lr: scale by ``min(ratio / lr, 1)`` instead of ``ratio``, so that no layer's rate exceeds ``lr``
            (LARC's clipping; solo-learn's ``LARS(clip_lr=True)``, github.com/vturrisi/solo-learn
            ``solo/utils/lars.py``, used by its CIFAR recipes).

    Example:
        >>> opt = LARS(model.parameters(), lr=0.1, weight_decay=1e-6)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
        clip_lr: bool = False,
    ) -> None:
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                        "trust_coefficient": trust_coefficient, "exclude_from_lars": False, "clip_lr": clip_lr}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if not group["exclude_from_lars"] and p.ndim > 1:
                    d_p = d_p.add(p, alpha=group["weight_decay"])
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(d_p)
                    ratio = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        group["trust_coefficient"] * w_norm / g_norm,
                        torch.ones_like(w_norm),
                    )
                    if group.get("clip_lr"):  # at lr 0, min(ratio / 0, 1) = 1 (as solo-learn's)
                        ratio = (ratio / group["lr"]).clamp(max=1.0) if group["lr"] > 0 else torch.ones_like(ratio)
                    d_p = d_p.mul(ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(d_p).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d_p)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


class LARC(torch.optim.SGD):
    """SGD behind LARC's gradient scaling, scaling mode (apex ``LARC(clip=False)``), as CaCo's linear probe.

    Before the SGD step, every parameter ``p`` with ``||p|| > 0`` and ``||g|| > 0`` (biases included) gets
    ``g <- (g + wd * p) * eta * ||p|| / (||g|| + wd * ||p|| + eps)``; the SGD step itself applies no weight
    decay. A parameter whose norm or gradient norm is zero (a zero-initialised bias at the first step) takes
    the plain SGD step. You et al. 2017 (LARS); CaCo (Wang & Qi, TPAMI 2023), ``ops/LARS.py`` upstream.

    Args:
        params: parameters or groups.
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty, folded into the scaled gradient.
        trust_coefficient: ``eta`` (CaCo: 0.001).
        eps: added to the denominator of the local rate.

    Example:
        >>> opt = LARC(classifier.parameters(), lr=0.4, momentum=0.9)
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=0.0)
        for group in self.param_groups:
            group.setdefault("larc_weight_decay", weight_decay)
            group.setdefault("trust_coefficient", trust_coefficient)
            group.setdefault("larc_eps", eps)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            wd = group["larc_weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                p_norm = torch.linalg.vector_norm(p)
                g_norm = torch.linalg.vector_norm(p.grad)
                if p_norm > 0 and g_norm > 0:
                    rate = group["trust_coefficient"] * p_norm / (g_norm + p_norm * wd + group["larc_eps"])
                    p.grad.add_(p, alpha=wd).mul_(rate)
        return super().step(closure)


def _split_weight_decay(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Move 1-D parameters of each group into a twin group with weight decay 0."""
    out = []
    for group in groups:
        params = list(group["params"])
        multi = [p for p in params if p.ndim > 1]
        single = [p for p in params if p.ndim <= 1]
        if multi:
            out.append({**group, "params": multi})
        if single:
            out.append({**group, "params": single, "weight_decay": 0.0})
    return out


@register_optimizer("sgd")
def _sgd(groups: list[dict[str, Any]], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum (``optim.nesterov`` for Nesterov's)."""
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)


@register_optimizer("adamw")
def _adamw(groups: list[dict[str, Any]], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019), MoCo v3's ViT optimiser."""
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


@register_optimizer("lars")
def _lars(groups: list[dict[str, Any]], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """:class:`LARS` with MoCo v3's exclusions."""
    return LARS(groups, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                trust_coefficient=cfg.lars_trust_coefficient, clip_lr=cfg.lars_clip_lr)


@register_optimizer("larc")
def _larc(groups: list[dict[str, Any]], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """:class:`LARC` (CaCo's linear probe)."""
    return LARC(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                trust_coefficient=cfg.lars_trust_coefficient)


def build_optimizer(groups: list[dict[str, Any]], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.name`` over the method's parameter groups, at peak rate ``lr``.

    Each group remembers its schedule factor: ``fixed_lr`` groups (SimSiam's predictor) keep ``lr``.
    """
    OPTIMIZERS.check(cfg.name)
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    groups = [g for g in groups if g["params"]]
    if cfg.exclude_bias_bn_wd:
        groups = _split_weight_decay(groups)
    for g in groups:
        g.setdefault("fixed_lr", False)
        g.setdefault("exclude_from_lars", False)
    optimizer = OPTIMIZERS[cfg.name](groups, cfg, lr)
    mark_groups(optimizer, cfg)
    set_learning_rate(optimizer, lr, lr)
    return optimizer


def mark_groups(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """Mark each group with what the schedules need (again after ``load_state_dict``, which keeps only the saved
    keys): ``lr_scale`` (``optim.bias_bn_lr_scale`` for groups of 1-D parameters) and ``scheduled_weight_decay``
    (the groups that decay, which ``optim.weight_decay_end`` schedules)."""
    for group in optimizer.param_groups:
        one_d = all(p.ndim <= 1 for p in group["params"])
        group["lr_scale"] = cfg.bias_bn_lr_scale if one_d else 1.0
        group["scheduled_weight_decay"] = bool(group.get("larc_weight_decay", group.get("weight_decay", 0.0)))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float, peak_lr: float) -> None:
    """Set every group's rate to ``lr``; ``fixed_lr`` groups stay at ``peak_lr`` (SimSiam, Chen & He 2021); a group's
    ``lr_scale`` multiplies either (Barlow Twins' separate rate of biases and norms)."""
    for group in optimizer.param_groups:
        group["lr"] = (peak_lr if group.get("fixed_lr") else lr) * group.get("lr_scale", 1.0)


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """Set the weight decay of every group that decays (``scheduled_weight_decay``, marked by
    :func:`build_optimizer`): DINO's cosine weight-decay schedule. Groups without weight decay keep none."""
    for group in optimizer.param_groups:
        if group.get("scheduled_weight_decay"):
            group["weight_decay" if "larc_weight_decay" not in group else "larc_weight_decay"] = weight_decay
