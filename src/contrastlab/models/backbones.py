"""Backbone registry: a name -> a feature extractor ``[B, 3, H, W] -> [B, D]`` and its ``D``.

Names:

- ``resnet18``, ``resnet34``, ``resnet50``: torchvision ResNets (He et al. 2016), random init, the
  classifier replaced by ``nn.Identity``. ``cifar_stem=True`` swaps the 7x7/2 stem convolution for a
  3x3/1 one and drops the max-pool, the usual stem for 32x32 inputs (SimCLR, Chen et al. 2020, appendix B.9).
- ``resnet20``, ``resnet32``, ``resnet56``: the CIFAR ResNets of :mod:`contrastlab.models.cifar_resnet`;
  they accept ``width``. They already have a CIFAR stem, so ``cifar_stem`` changes nothing for them.

Every backbone accepts ``zero_init_residual``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from contrastlab.errors import ConfigError
from contrastlab.models.cifar_resnet import cifar_resnet

__all__ = ["BACKBONES", "build_backbone"]

_TORCHVISION_KWARGS = ("zero_init_residual",)
_CIFAR_KWARGS = ("width", "zero_init_residual")


def _torchvision_resnet(name: str) -> Callable[..., tuple[nn.Module, int]]:
    def build(cifar_stem: bool, zero_init_residual: bool = False) -> tuple[nn.Module, int]:
        import torchvision  # imported here: it costs seconds and only these backbones need it

        net = getattr(torchvision.models, name)(weights=None, zero_init_residual=zero_init_residual)
        dim = net.fc.in_features
        net.fc = nn.Identity()
        if cifar_stem:
            net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
            net.maxpool = nn.Identity()
        return net, dim

    return build


def _cifar(depth: int) -> Callable[..., tuple[nn.Module, int]]:
    def build(
        cifar_stem: bool, width: float = 1.0, zero_init_residual: bool = False
    ) -> tuple[nn.Module, int]:
        del cifar_stem  # already a 3x3 stride-1 stem without max-pool
        net = cifar_resnet(depth, width=width, zero_init_residual=zero_init_residual)
        return net, net.num_features

    return build


BACKBONES: dict[str, tuple[Callable[..., tuple[nn.Module, int]], tuple[str, ...]]] = {
    "resnet18": (_torchvision_resnet("resnet18"), _TORCHVISION_KWARGS),
    "resnet34": (_torchvision_resnet("resnet34"), _TORCHVISION_KWARGS),
    "resnet50": (_torchvision_resnet("resnet50"), _TORCHVISION_KWARGS),
    "resnet20": (_cifar(20), _CIFAR_KWARGS),
    "resnet32": (_cifar(32), _CIFAR_KWARGS),
    "resnet56": (_cifar(56), _CIFAR_KWARGS),
}
"""name -> (builder, accepted keyword arguments)."""


def build_backbone(name: str, cifar_stem: bool = False, **kw: object) -> tuple[nn.Module, int]:
    """Build a backbone by name.

    Args:
        name: one of :data:`BACKBONES`.
        cifar_stem: 3x3 stride-1 stem and no max-pool (torchvision ResNets only; the CIFAR ResNets
            always have it).
        **kw: ``zero_init_residual`` for every backbone, ``width`` for the CIFAR ResNets.

    Returns:
        ``(module, feature_dim)``; the module maps ``[B, 3, H, W]`` to ``[B, feature_dim]``.

    Raises:
        ConfigError: unknown name or keyword argument.

    Example:
        >>> net, dim = build_backbone("resnet18", cifar_stem=True)
        >>> dim
        512
    """
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; valid names: {', '.join(sorted(BACKBONES))}")
    builder, accepted = BACKBONES[name]
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        raise ConfigError(
            f"backbone {name!r} does not accept {', '.join(unknown)}; valid keyword arguments: "
            f"{', '.join(accepted)}"
        )
    return builder(cifar_stem, **kw)
