"""Crop laws (view planners): one class per law, registered by name (``views.planner``).

Crops are boxes (``docs/architecture.md``): a planner decides where each view's crop lies and nothing more. Each
planner class holds its config keys (``Settings``), its view sizes, its per-image law (``plan``, CPU workers) and
its batched law (``plan_batch``, the device pipeline) side by side (:mod:`~contrastlab.views.planners.base`).

Built-in planners: ``random_resized``, ``multicrop``, ``padded_crop``, ``fixed``, ``center``, ``joint_crop``,
``contrastive_crop``, ``simccrop``, ``semantic_crop``. A planner of your own is one module that subclasses
:class:`Planner` and registers itself with :func:`contrastlab.register_planner` (``docs/extending.md``).

Example:
    >>> planner = make_planner("multicrop", num_small=4)
    >>> planner.num_views
    6
"""

from __future__ import annotations

import inspect
from typing import Any

from contrastlab.errors import ConfigError
from contrastlab.registry import PLANNERS
from contrastlab.views.planners.base import Localisation, NoSettings, Planner, PlannerContext
from contrastlab.views.planners.center_crop import CenterCropPlanner
from contrastlab.views.planners.contrastive_crop import ContrastiveCropPlanner, SimCCropPlanner
from contrastlab.views.planners.fixed_box import FixedBoxPlanner
from contrastlab.views.planners.joint_crop import JointCropPlanner
from contrastlab.views.planners.multicrop import MultiCropPlanner
from contrastlab.views.planners.padded_crop import PaddedCropPlanner
from contrastlab.views.planners.random_resized import (
    RandomResizedCropPlanner,
    central_crop_box,
    sample_resized_crop,
)
from contrastlab.views.planners.semantic_crop import SemanticCropPlanner

__all__ = [
    "PLANNERS",
    "CenterCropPlanner",
    "ContrastiveCropPlanner",
    "FixedBoxPlanner",
    "JointCropPlanner",
    "Localisation",
    "MultiCropPlanner",
    "NoSettings",
    "PaddedCropPlanner",
    "Planner",
    "PlannerContext",
    "RandomResizedCropPlanner",
    "SemanticCropPlanner",
    "SimCCropPlanner",
    "central_crop_box",
    "make_planner",
    "sample_resized_crop",
]


def make_planner(name: str, **kwargs: Any) -> Planner:
    """Build a registered planner from its name and constructor arguments.

    Raises:
        ConfigError: If the name or a keyword is unknown (with the nearest names), or a value is invalid.
    """
    import difflib

    factory = PLANNERS[name]
    accepted = [p for p in inspect.signature(factory).parameters if p != "self"]
    for key in kwargs:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=3)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise ConfigError(f"planner {name!r} has no option {key!r}{hint}; valid options: {accepted}")
    return factory(**kwargs)
