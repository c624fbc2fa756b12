"""Backbone registry: a name -> a feature extractor ``[B, 3, H, W] -> [B, D]`` and its ``D``.

Names (the architecture zoo of Mutual Contrastive Learning, Yang et al., AAAI 2022,
github.com/winycg/MCL, plus the usual ImageNet ResNets):

- ``resnet18``, ``resnet34``, ``resnet50``: torchvision ResNets (He et al. 2016), random init, the
  classifier replaced by ``nn.Identity``. ``cifar_stem=True`` swaps the 7x7/2 stem convolution for a
  3x3/1 one and drops the max-pool, the usual stem for 32x32 inputs (SimCLR, Chen et al. 2020, appendix B.9).
- ``resnet20``, ``resnet32``, ``resnet56``, ``resnet110_basic``: the BasicBlock CIFAR ResNets of
  :mod:`contrastlab.models.cifar_resnet` (depth ``6n + 2``, 64-d features).
- ``resnet110``: MCL's ResNet-110, **Bottleneck** blocks (expansion 4, 12 per stage, widths 16/32/64,
  256-d features, 1.17M parameters with a 100-class fc), not He et al.'s BasicBlock ResNet-110, which
  is ``resnet110_basic``. The CIFAR ResNets accept ``width``.
- ``wrn_16_2``, ``wrn_40_2``, ``wrn_28_4``: pre-activation WideResNets WRN-depth-k
  (:mod:`contrastlab.models.wrn`, ``64k``-d features); they accept ``dropout`` (0 by default, as MCL).
- ``shufflenetv2_05x``, ``shufflenetv2_1x``: CIFAR ShuffleNetV2 (:mod:`contrastlab.models.shufflenetv2`,
  1024-d features).
- ``hcgnet_a1``, ``hcgnet_a2``: HCGNet-A1/A2 (:mod:`contrastlab.models.hcgnet`, 414-d / 716-d).
- ``vit_small``, ``vit_base``, ``vit_conv_small``, ``vit_conv_base``: MoCo v3's ViTs on timm
  (:mod:`contrastlab.models.vit`, 384-d / 768-d class token); ``vit_tiny_dino``, ``vit_small_dino``, ``vit_base_dino``: DINO's
  (learned position embedding, interpolated for any input side). They take ``img_size`` (the trainer passes
  ``data.image_size``), ``stop_grad_conv1`` and ``drop_path_rate`` (``model.drop_path_rate``: stochastic depth,
  DINO's student 0.1), and need ``pip install "contrastlab[vit]"``.

Only the torchvision ResNets are changed by ``cifar_stem``; every other backbone is built for 32x32
inputs already and ignores it. Every backbone accepts ``zero_init_residual``; the ResNets and WRNs zero
the last BN scale of each residual branch, ShuffleNetV2 and HCGNet have no residual sum to zero and
reject ``zero_init_residual=True``.

Every backbone but the ViTs is *staged* (:mod:`contrastlab.models.staged`): it lists its layers as named stages, the
cut points of the shared trunk of an MCL cohort (:mod:`contrastlab.models.cohort`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from contrastlab.errors import ConfigError
from contrastlab.models.cifar_resnet import cifar_resnet
from contrastlab.models.hcgnet import hcgnet
from contrastlab.models.shufflenetv2 import shufflenetv2
from contrastlab.models.vit import VIT_ARCHS, build_vit
from contrastlab.models.wrn import wide_resnet
from contrastlab.registry import BACKBONES as _BACKBONES
from contrastlab.registry import register_backbone

__all__ = ["BACKBONES", "backbone_options", "build_backbone"]


def _torchvision_resnet(name: str) -> Callable[..., tuple[nn.Module, int]]:
    def build(cifar_stem: bool = False, zero_init_residual: bool = False) -> tuple[nn.Module, int]:
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


def _cifar(depth: int, bottleneck: bool = False) -> Callable[..., tuple[nn.Module, int]]:
    def build(
        cifar_stem: bool = False, width: float = 1.0, zero_init_residual: bool = False
    ) -> tuple[nn.Module, int]:
        del cifar_stem  # already a 3x3 stride-1 stem without max-pool
        net = cifar_resnet(depth, width=width, zero_init_residual=zero_init_residual, bottleneck=bottleneck)
        return net, net.num_features

    return build


def _wrn(depth: int, widen_factor: int) -> Callable[..., tuple[nn.Module, int]]:
    def build(
        cifar_stem: bool = False, dropout: float = 0.0, zero_init_residual: bool = False
    ) -> tuple[nn.Module, int]:
        del cifar_stem  # already a 3x3 stride-1 stem
        net = wide_resnet(depth, widen_factor, dropout=dropout, zero_init_residual=zero_init_residual)
        return net, net.num_features

    return build


def _non_residual(name: str, factory: Callable[[], nn.Module]) -> Callable[..., tuple[nn.Module, int]]:
    def build(cifar_stem: bool = False, zero_init_residual: bool = False) -> tuple[nn.Module, int]:
        del cifar_stem  # already a 3x3 stride-1 stem without max-pool
        if zero_init_residual:
            raise ConfigError(
                f"backbone {name!r} has no residual sum to zero-initialise; zero_init_residual=True is "
                "valid for the ResNets and WideResNets only"
            )
        net = factory()
        return net, net.num_features

    return build


def _vit(name: str) -> Callable[..., tuple[nn.Module, int]]:
    def build(cifar_stem: bool = False, img_size: int = 224, stop_grad_conv1: bool = False,
              zero_init_residual: bool = False, drop_path_rate: float = 0.0) -> tuple[nn.Module, int]:
        del cifar_stem  # a ViT's stem is its patch embedding
        if zero_init_residual:
            raise ConfigError(f"backbone {name!r} is a ViT; zero_init_residual=True is valid for the ResNets and "
                              "WideResNets only")
        return build_vit(name, img_size=img_size, stop_grad_conv1=stop_grad_conv1, drop_path_rate=drop_path_rate)

    return build


_BUILTINS: dict[str, tuple[Callable[..., tuple[nn.Module, int]], bool]] = {
    "resnet18": (_torchvision_resnet("resnet18"), False),
    "resnet34": (_torchvision_resnet("resnet34"), False),
    "resnet50": (_torchvision_resnet("resnet50"), False),
    "resnet20": (_cifar(20), True),
    "resnet32": (_cifar(32), True),
    "resnet56": (_cifar(56), True),
    "resnet110": (_cifar(110, bottleneck=True), True),
    "resnet110_basic": (_cifar(110), True),
    "wrn_16_2": (_wrn(16, 2), True),
    "wrn_40_2": (_wrn(40, 2), True),
    "wrn_28_4": (_wrn(28, 4), True),
    "shufflenetv2_05x": (_non_residual("shufflenetv2_05x", lambda: shufflenetv2(0.5)), True),
    "shufflenetv2_1x": (_non_residual("shufflenetv2_1x", lambda: shufflenetv2(1.0)), True),
    "hcgnet_a1": (_non_residual("hcgnet_a1", lambda: hcgnet("a1")), True),
    "hcgnet_a2": (_non_residual("hcgnet_a2", lambda: hcgnet("a2")), True),
    **{name: (_vit(name), False) for name in VIT_ARCHS},
}
"""The built-in zoo: name -> (builder, built for small images). Small-input networks keep a 3x3 stride-1 stem; the
others downsample early (the ResNets' 7x7/2 + max-pool unless ``cifar_stem``, the ViTs' 16x16 patches)."""

for _name, (_builder, _small) in _BUILTINS.items():
    register_backbone(_name, _builder, small_input=_small)

BACKBONES = _BACKBONES
"""The backbone registry (:data:`contrastlab.registry.BACKBONES`): name -> builder ``(**options) -> (module, dim)``
whose keyword arguments are the options it accepts; ``small_input`` is its information. Users add theirs with
:func:`contrastlab.register_backbone`."""


def backbone_options(name: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments backbone ``name``'s builder accepts."""
    params = inspect.signature(BACKBONES[name]).parameters
    return {k: p for k, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}


def build_backbone(name: str, **options: object) -> tuple[nn.Module, int]:
    """Build a backbone by name.

    Args:
        name: a name of :data:`BACKBONES`.
        **options: ``cifar_stem`` (3x3 stride-1 stem and no max-pool; torchvision ResNets only, the CIFAR
            networks always have it) and ``zero_init_residual`` for every built-in backbone, ``width`` for the
            CIFAR ResNets, ``dropout`` for the WideResNets, ``img_size`` and ``stop_grad_conv1`` for the ViTs.

    Returns:
        ``(module, feature_dim)``; the module maps ``[B, 3, H, W]`` to ``[B, feature_dim]``.

    Raises:
        ConfigError: unknown name or option; ``zero_init_residual=True`` for a backbone without residual sums.

    Example:
        >>> net, dim = build_backbone("resnet18", cifar_stem=True)
        >>> dim
        512
    """
    accepted = backbone_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"backbone {name!r} does not accept {', '.join(unknown)}; valid options: {', '.join(accepted) or 'none'}"
        )
    return BACKBONES[name](**options)
