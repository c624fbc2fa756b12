"""Methods: SimCLR, MoCo v1/v2/v3, BYOL, SimSiam, CaCo, MCL (supervised and on MoCo) and the supervised
baseline, and their registry.

Each method class registers itself (``@register_method()``); ``build_method(name, backbone, feature_dim,
**kwargs)`` checks the name and the keyword arguments against the method's constructor, so a typo in a recipe
fails with the nearest valid names.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from torch import nn

from contrastlab.errors import ConfigError
from contrastlab.methods.barlow_twins import BarlowTwins
from contrastlab.methods.base import Method, StepOutput, make_param_groups
from contrastlab.methods.byol import BYOL
from contrastlab.methods.caco import CaCo
from contrastlab.methods.dino import DINO
from contrastlab.methods.mcl import MCL
from contrastlab.methods.moco import MoCo
from contrastlab.methods.moco_mcl import MoCoMCL
from contrastlab.methods.mocov3 import MoCoV3
from contrastlab.methods.simclr import SimCLR
from contrastlab.methods.simsiam import SimSiam
from contrastlab.methods.supervised import Supervised
from contrastlab.methods.swav import SwAV
from contrastlab.methods.vicreg import VICReg
from contrastlab.registry import METHODS as _METHODS

__all__ = [
    "BYOL",
    "DINO",
    "MCL",
    "METHODS",
    "BarlowTwins",
    "CaCo",
    "Method",
    "MoCo",
    "MoCoMCL",
    "MoCoV3",
    "SimCLR",
    "SimSiam",
    "StepOutput",
    "Supervised",
    "SwAV",
    "VICReg",
    "build_method",
    "make_param_groups",
    "method_defaults",
    "method_kwargs",
]

METHODS = _METHODS
"""Registry name -> method class (:data:`contrastlab.registry.METHODS`; users add theirs with
:func:`contrastlab.register_method`)."""

_POSITIONAL = ("self", "backbone", "feature_dim")

RUN_SUPPLIED = ("num_classes", "dataset_targets", "backbone_factory")
"""Constructor arguments the trainer supplies from the run (the dataset's classes and labels, more backbones of the
model's kind) when the config does not set them."""


def method_kwargs(name: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments method ``name`` accepts besides ``backbone`` and ``feature_dim``."""
    params = inspect.signature(METHODS[name].__init__).parameters
    return {k: p for k, p in params.items() if k not in _POSITIONAL}


def method_defaults(name: str) -> dict[str, Any]:
    """The constructor defaults of method ``name`` that a config can hold (plain values: numbers, strings, None,
    lists); what a run uses for the ``method.*`` keys nobody set."""
    defaults = {}
    for key, param in method_kwargs(name).items():
        if key in RUN_SUPPLIED or param.default is inspect.Parameter.empty:
            continue
        if param.kind not in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            continue
        value = _as_config_value(param.default)
        if value is not _NOT_PLAIN:
            defaults[key] = value
    return defaults


_NOT_PLAIN = object()


def _as_config_value(value: Any) -> Any:
    """``value`` as a YAML-able config value (tuples as lists), or ``_NOT_PLAIN``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_as_config_value(v) for v in value]
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else items
    return _NOT_PLAIN


def build_method(name: str, backbone: nn.Module, feature_dim: int, **kwargs: Any) -> Method:
    """Build a registered method.

    Args:
        name: a name of :data:`METHODS` (``simclr``, ``moco``, ``mocov3``, ``byol``, ``simsiam``, ``caco``, ``mcl``,
            ``moco_mcl``, ``supervised``, or one registered with :func:`contrastlab.register_method`).
        backbone: feature extractor ``[B, 3, H, W] -> [B, feature_dim]``.
        feature_dim: its output dimension.
        **kwargs: the method's constructor arguments.

    Raises:
        ConfigError: unknown name (with the nearest names), unknown or missing keyword arguments
            (with the valid ones).

    Example:
        >>> from contrastlab.models import build_backbone
        >>> net, dim = build_backbone("resnet20", width=0.25)
        >>> method = build_method("moco", net, dim, queue_size=1024, temperature=0.2)
    """
    METHODS.check(name)
    accepted = method_kwargs(name)
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(accepted), n=1, cutoff=0.6)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"method {name!r} got unexpected keyword argument(s) {', '.join(hints)}; "
            f"valid ones: {', '.join(accepted)}"
        )
    missing = [k for k, p in accepted.items() if p.default is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise ConfigError(f"method {name!r} needs keyword argument(s) {', '.join(missing)}")
    try:
        return METHODS[name](backbone, feature_dim, **kwargs)
    except ConfigError:
        raise
    except (ValueError, RuntimeError, TypeError) as exc:  # e.g. a layer width of 0 or -1
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k != "dataset_targets")
        raise ConfigError(f"method {name!r} cannot be built with {given}: {exc}. Check the method.* values "
                          "(widths and sizes must be positive)") from exc
