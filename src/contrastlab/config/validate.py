"""Range checks of config values, run when a config is built: a bad value fails with the key and the fix.

Types and fixed choices (``Literal`` fields) are checked by :mod:`contrastlab.config.load`; this module checks what
a type cannot say (a batch size must be positive, a momentum lies in [0, 1), no value may be NaN, two settings
that exclude each other) and every name against its registry (:data:`NAMED`), when the config loads, so
``train --show`` and ``train`` fail alike.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from contrastlab.errors import ConfigError
from contrastlab.registry import (
    BACKBONES,
    DATASETS,
    LOGGERS,
    LR_SCHEDULES,
    METHODS,
    MOMENTUM_SCHEDULES,
    OBSERVERS,
    OPTIMIZERS,
    PHOTOMETRICS,
    Registry,
)

Check = Callable[[Any], bool]


def _positive_int(v: Any) -> bool:
    return v is None or v > 0


def _nonneg(v: Any) -> bool:
    return v is None or v >= 0


def _positive(v: Any) -> bool:
    return v > 0


def _unit_open(v: Any) -> bool:
    return 0 <= v < 1


def _unit_closed(v: Any) -> bool:
    return 0 <= v <= 1


def _fraction(v: Any) -> bool:
    return 0 < v <= 1


def _pair_in_unit(v: Any) -> bool:
    return len(v) == 2 and 0 < v[0] <= v[1] <= 1


def _positive_pair(v: Any) -> bool:
    return len(v) == 2 and 0 < v[0] <= v[1]


def _betas(v: Any) -> bool:
    return len(v) == 2 and all(0 <= b < 1 for b in v)


RULES: dict[str, tuple[Check, str]] = {
    "data.batch_size": (_positive_int, "a positive integer"),
    "data.samples_per_class": (_positive_int, "a positive integer"),
    "data.epoch_length": (_nonneg, ">= 0 (0 = the dataset size)"),
    "data.subset": (_nonneg, ">= 0 (0 = all images)"),
    "data.workers": (_nonneg, ">= 0"),
    "data.image_size": (_positive_int, "a positive integer, or null for the dataset's native size"),
    "views.num_views": (_positive_int, "a positive integer"),
    "views.num_small": (_nonneg, ">= 0"),
    "views.small_size": (_nonneg, ">= 0 (0 = half the crop size)"),
    "views.scale": (_pair_in_unit, "[min, max] with 0 < min <= max <= 1"),
    "views.small_scale": (_pair_in_unit, "[min, max] with 0 < min <= max <= 1"),
    "views.ratio": (_positive_pair, "[min, max] with 0 < min <= max"),
    "views.padding": (_nonneg, ">= 0"),
    "views.joint_epsilon": (_nonneg, ">= 0"),
    "views.ccrop_alpha": (_positive, "> 0"),
    "views.box_warmup_epochs": (_nonneg, ">= 0"),
    "views.box_update_every": (_positive_int, "a positive integer"),
    "views.box_threshold": (_unit_open, "in [0, 1)"),
    "views.semantic_suppression": (_unit_closed, "in [0, 1]"),
    "model.width": (lambda v: 0 < v <= 64, "in (0, 64] (a channel multiplier)"),
    "model.peers": (_positive_int, "a positive integer"),
    "model.drop_path_rate": (_unit_open, "in [0, 1) (a ViT's stochastic depth)"),
    "optim.lr": (_nonneg, ">= 0"),
    "optim.base_batch_size": (_positive_int, "a positive integer"),
    "optim.weight_decay": (_nonneg, ">= 0"),
    "optim.momentum": (_unit_open, "in [0, 1)"),
    "optim.betas": (_betas, "two numbers in [0, 1)"),
    "optim.lars_trust_coefficient": (_positive, "> 0"),
    "optim.warmup_epochs": (_nonneg, ">= 0"),
    "optim.warmup_start_lr": (_nonneg, ">= 0"),
    "optim.final_lr": (_nonneg, ">= 0"),
    "optim.final_lr_ratio": (lambda v: v is None or 0 <= v <= 1, "in [0, 1] (a fraction of the peak lr), or null"),
    "optim.gamma": (_nonneg, ">= 0 (0: lr 0 after the first milestone, upstream ContrastiveCrop MoCo v1)"),
    "optim.clip_grad": (_nonneg, ">= 0 (0 = no clipping)"),
    "optim.weight_decay_end": (lambda v: v is None or _nonneg(v), ">= 0, or null (constant weight decay)"),
    "optim.bias_bn_lr_scale": (_nonneg, ">= 0"),
    "train.epochs": (_positive_int, "a positive integer"),
    "train.max_steps": (_nonneg, ">= 0 (0 = no limit)"),
    "train.ema_momentum": (_unit_closed, "in [0, 1]"),
    "train.checkpoint_every": (_nonneg, ">= 0"),
    "train.keep_checkpoints": (_nonneg, ">= 0 (0 = keep all)"),
    "train.checkpoint_every_steps": (_nonneg, ">= 0"),
    "train.log_every": (_positive_int, "a positive integer"),
    "train.finite_check_every": (_positive_int, "a positive integer (1 = a host check after every step)"),
    "train.max_skipped_steps": (_nonneg, ">= 0"),
    "train.lock_timeout": (_positive, "> 0 seconds"),
    "monitor.knn_every": (_nonneg, ">= 0"),
    "monitor.knn_every_epoch_until": (_nonneg, ">= 0"),
    "monitor.knn_k": (_positive_int, "a positive integer"),
    "monitor.knn_temperature": (_positive, "> 0"),
    "monitor.bank_fraction": (_fraction, "in (0, 1]"),
    "monitor.max_bank": (_nonneg, ">= 0 (0 = all)"),
    "monitor.max_test": (_nonneg, ">= 0 (0 = all)"),
    "monitor.classify_every": (_nonneg, ">= 0"),
    "monitor.collapse_threshold": (_nonneg, ">= 0 (0 = off)"),
    "monitor.collapse_after_epoch": (_nonneg, ">= 0"),
    "log.project": (lambda v: bool(v.strip()), "a non-empty name (the wandb project, the MLflow experiment)"),
    "linear.epochs": (_positive_int, "a positive integer"),
    "linear.batch_size": (_positive_int, "a positive integer"),
    "linear.lr": (_nonneg, ">= 0"),
    "linear.momentum": (_unit_open, "in [0, 1)"),
    "linear.weight_decay": (_nonneg, ">= 0"),
    "linear.scale": (_pair_in_unit, "[min, max] with 0 < min <= max <= 1"),
    "linear.crop_fraction": (_fraction, "in (0, 1]"),
    "linear.max_train": (_nonneg, ">= 0 (0 = all)"),
    "linear.max_test": (_nonneg, ">= 0 (0 = all)"),
    "linear.n_last_blocks": (_positive_int, "a positive integer (a ViT's last blocks whose class tokens the probe reads)"),
    "finetune.epochs": (_positive_int, "a positive integer"),
    "finetune.batch_size": (_positive_int, "a positive integer"),
    "finetune.lr": (_nonneg, ">= 0"),
    "finetune.base_batch_size": (_positive_int, "a positive integer"),
    "finetune.weight_decay": (_nonneg, ">= 0"),
    "finetune.betas": (_betas, "two numbers in [0, 1)"),
    "finetune.warmup_epochs": (_nonneg, ">= 0"),
    "finetune.warmup_lr": (_nonneg, ">= 0"),
    "finetune.min_lr": (_nonneg, ">= 0"),
    "finetune.clip_grad": (_nonneg, ">= 0 (0 = no clipping)"),
    "finetune.drop_path": (_unit_open, "in [0, 1)"),
    "finetune.label_smoothing": (_unit_open, "in [0, 1)"),
    "finetune.mixup": (_nonneg, ">= 0 (0 = off)"),
    "finetune.cutmix": (_nonneg, ">= 0 (0 = off)"),
    "finetune.mixup_prob": (_unit_closed, "in [0, 1]"),
    "finetune.mixup_switch_prob": (_unit_closed, "in [0, 1]"),
    "finetune.color_jitter": (_nonneg, ">= 0"),
    "finetune.reprob": (_unit_closed, "in [0, 1]"),
    "finetune.recount": (_positive_int, "a positive integer"),
    "finetune.repeated_aug": (_positive_int, "a positive integer (1 = off)"),
    "finetune.ema_decay": (_unit_open, "in [0, 1) (0 = off)"),
    "finetune.crop_fraction": (_fraction, "in (0, 1]"),
    "finetune.eval_every": (_nonneg, ">= 0 (0 = the final epoch only)"),
}
"""Dotted key -> (check, what the value must be)."""


def _has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_has_nan(v) for v in value)
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    return False


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(_flatten(value, key + "."))
        elif key in ("method.params", "views.params"):
            section = key.split(".")[0]
            out.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def validate(cfg: Any) -> None:
    """Raise :class:`ConfigError` for the first value out of its range (or not finite), naming the key."""
    for key, value in _flatten(cfg).items():
        if _has_nan(value):
            raise ConfigError(f"config key {key} must be a finite number, got {value!r}")
        rule = RULES.get(key)
        if rule is not None and not rule[0](value):
            raise ConfigError(f"config key {key} must be {rule[1]}, got {value!r}")


NAMED: dict[str, Registry] = {
    "data.name": DATASETS,
    "views.photometric": PHOTOMETRICS,
    "model.arch": BACKBONES,
    "optim.name": OPTIMIZERS,
    "optim.schedule": LR_SCHEDULES,
    "train.ema_schedule": MOMENTUM_SCHEDULES,
    "linear.optimizer": OPTIMIZERS,
    "linear.schedule": LR_SCHEDULES,
    "observers": OBSERVERS,
    "log.to": LOGGERS,
}
"""Config keys that name a registry entry (``method.name`` is checked when the method section is read)."""


def _value(cfg: Any, key: str) -> Any:
    for name in key.split("."):
        cfg = getattr(cfg, name)
    return cfg


def check_names(cfg: Any) -> None:
    """Raise the registry's :class:`ConfigError` (nearest names, every valid one) for a name no registry holds."""
    for key, registry in NAMED.items():
        value = _value(cfg, key)
        for name in value if isinstance(value, list) else [value]:
            registry.check(name, key)
        if isinstance(value, list) and len(set(value)) < len(value):
            twice = sorted({n for n in value if value.count(n) > 1})
            raise ConfigError(f"config key {key} lists {', '.join(map(repr, twice))} more than once; list each once")
    from contrastlab.methods.base import evaluated_module

    evaluated_module(METHODS[cfg.method.name], cfg.model.evaluated_network)  # a method that keeps that network
    t = cfg.train
    if t.finite_check_every > 1 and t.nonfinite == "skip":
        raise ConfigError("train.nonfinite=skip decides at every step whether to skip it; it needs "
                          f"train.finite_check_every=1, got {t.finite_check_every}")
