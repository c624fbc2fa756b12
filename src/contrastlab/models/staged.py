"""Staged networks: a backbone seen as an ordered list of named stages.

Mutual Contrastive Learning (Yang et al., AAAI 2022; github.com/winycg/MCL) builds
its 4-peer cohorts as one trunk shared by all peers followed by per-peer branches, in the style of ONE
(Lan et al., NeurIPS 2018). To cut any backbone at a named point, every backbone of the zoo declares a
*stage spec*: the stage names in forward order, and for each stage the attributes of the network that
it runs, in order. Running the stages one after the other is the backbone's forward pass (the tests
check this against each class's own ``forward``).

A class declares its spec as the class attributes ``stage_spec`` and ``upstream_shared_until`` (the
stage where upstream MCL's shared trunk ends). torchvision's ResNets cannot carry them, so this module
knows their layout: ``stem`` (conv1, bn1, relu, maxpool), ``layer1`` ... ``layer4``, ``pool``
(avgpool, flatten, fc; the fc is ``nn.Identity`` in a backbone).

Example:
    >>> from contrastlab.models.cifar_resnet import CifarResNet
    >>> [name for name, _ in named_stages(CifarResNet(20, width=0.25))]
    ['stem', 'layer1', 'layer2', 'layer3', 'pool']
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import torch
from torch import nn

from contrastlab.errors import ConfigError

__all__ = [
    "FLATTEN",
    "StageSpec",
    "named_stages",
    "run_stages",
    "stage_names",
    "stage_spec",
    "upstream_shared_until",
]

StageSpec = tuple[tuple[str, tuple[str, ...]], ...]
"""``((stage name, (attribute, ...)), ...)`` in forward order."""

FLATTEN = "flatten"
"""Spec entry for ``torch.flatten(x, 1)``, which no attribute holds (a stage gets an ``nn.Flatten(1)``)."""

_TORCHVISION_RESNET_SPEC: StageSpec = (
    ("stem", ("conv1", "bn1", "relu", "maxpool")),
    ("layer1", ("layer1",)),
    ("layer2", ("layer2",)),
    ("layer3", ("layer3",)),
    ("layer4", ("layer4",)),
    ("pool", ("avgpool", FLATTEN, "fc")),
)
_TORCHVISION_RESNET_SPLIT = "layer2"  # upstream MCL resnet_imagenet.py: conv1 through layer2 shared


def _torchvision_resnet_class() -> type | None:
    """torchvision's ResNet class if torchvision is already imported (else no net can be one)."""
    module = sys.modules.get("torchvision.models.resnet")
    return getattr(module, "ResNet", None) if module is not None else None


def stage_spec(net: nn.Module) -> StageSpec:
    """The stage spec of ``net``.

    Raises:
        ConfigError: ``net`` declares no stages (it is not a backbone of the zoo).
    """
    spec = getattr(type(net), "stage_spec", None)
    if spec is not None:
        return spec
    tv_resnet = _torchvision_resnet_class()
    if tv_resnet is not None and isinstance(net, tv_resnet):
        return _TORCHVISION_RESNET_SPEC
    raise ConfigError(
        f"{type(net).__name__} declares no stages; staged backbones are those of "
        "contrastlab.models.BACKBONES (give a class the attributes stage_spec and upstream_shared_until)"
    )


def stage_names(net: nn.Module) -> list[str]:
    """The stage names of ``net`` in forward order."""
    return [name for name, _ in stage_spec(net)]


def upstream_shared_until(net: nn.Module) -> str:
    """The stage where upstream MCL's shared trunk ends for ``net``'s family (arXiv 2104.12565; github.com/winycg/MCL)."""
    split = getattr(type(net), "upstream_shared_until", None)
    if split is not None:
        return split
    stage_spec(net)  # raises for a network that is not staged
    return _TORCHVISION_RESNET_SPLIT


def _stage_module(net: nn.Module, attributes: tuple[str, ...]) -> nn.Module:
    modules = [(a, nn.Flatten(1) if a == FLATTEN else getattr(net, a)) for a in attributes]
    if len(modules) == 1:
        return modules[0][1]
    return nn.Sequential(OrderedDict(modules))


def named_stages(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """``net``'s stages as ``(name, module)`` pairs; calling the modules in order is ``net.forward``.

    A stage made of several attributes is an ``nn.Sequential`` built around the network's own
    submodules (no copy): the stages share their parameters with ``net``.
    """
    return [(name, _stage_module(net, attributes)) for name, attributes in stage_spec(net)]


def run_stages(net: nn.Module, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Run stages ``start`` to ``stop - 1`` (indices into :func:`stage_names`) of ``net`` on ``x``.

    The attributes are looked up at call time, so a module swapped in later (for example by
    ``nn.SyncBatchNorm.convert_sync_batchnorm``) is the one that runs.
    """
    for _, attributes in stage_spec(net)[start:stop]:
        for attribute in attributes:
            x = torch.flatten(x, 1) if attribute == FLATTEN else getattr(net, attribute)(x)
    return x
