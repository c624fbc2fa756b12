"""contrastlab: contrastive self-supervised learning of visual representations.

The main names are importable from the package itself; each is loaded on first use, so ``import contrastlab``
stays cheap (PEP 562 module attributes).

Example:
    >>> import contrastlab
    >>> "simclr" in contrastlab.METHODS
    True
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # registries and the functions that extend them
    "Registry": "contrastlab.registry",
    "METHODS": "contrastlab.registry",
    "PLANNERS": "contrastlab.registry",
    "DATASETS": "contrastlab.registry",
    "BACKBONES": "contrastlab.registry",
    "PHOTOMETRICS": "contrastlab.registry",
    "OBSERVERS": "contrastlab.registry",
    "LOGGERS": "contrastlab.registry",
    "OPTIMIZERS": "contrastlab.registry",
    "IMPORTERS": "contrastlab.registry",
    "register_importer": "contrastlab.registry",
    "register_method": "contrastlab.registry",
    "register_planner": "contrastlab.registry",
    "register_dataset": "contrastlab.registry",
    "register_backbone": "contrastlab.registry",
    "register_photometric": "contrastlab.registry",
    "register_observer": "contrastlab.registry",
    "register_logger": "contrastlab.registry",
    "register_optimizer": "contrastlab.registry",
    "register_lr_schedule": "contrastlab.registry",
    "register_momentum_schedule": "contrastlab.registry",
    # configuration
    "Config": "contrastlab.config.schema",
    "load_config": "contrastlab.config.load",
    # training and what watches it
    "Trainer": "contrastlab.engine.trainer",
    "train": "contrastlab.engine.trainer",
    "Observer": "contrastlab.observers.base",
    "Run": "contrastlab.observers.base",
    "Logger": "contrastlab.observers.loggers.base",
    # building blocks
    "Method": "contrastlab.methods.base",
    "StepOutput": "contrastlab.methods.base",
    "build_method": "contrastlab.methods",
    "build_backbone": "contrastlab.models.backbones",
    "build_dataset": "contrastlab.data",
    "ImageDataset": "contrastlab.data.base",
    "ArrayDataset": "contrastlab.data.base",
    "FileDataset": "contrastlab.data.base",
    "make_photometric": "contrastlab.views.photometric",
    "ViewDataset": "contrastlab.views.dataset",
    # studies: many runs, their states and their table
    "Study": "contrastlab.studies.study",
    # errors
    "ContrastlabError": "contrastlab.errors",
    "ConfigError": "contrastlab.errors",
    "DatasetError": "contrastlab.errors",
    "CheckpointError": "contrastlab.errors",
}

__all__ = ["__version__"]
__all__ += list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'contrastlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
