"""Models: the backbone zoo, staged networks and MCL peer cohorts, projection/prediction heads, EMA updates.

Backbones (:mod:`~contrastlab.models.backbones`): torchvision ResNets and the CIFAR architectures of
Mutual Contrastive Learning (Yang et al., AAAI 2022): CIFAR ResNets, WideResNets, ShuffleNetV2, HCGNet.
Each lists its layers as named stages (:mod:`~contrastlab.models.staged`), which
:mod:`~contrastlab.models.cohort` cuts into a shared trunk and per-peer branches.
"""

from contrastlab.models.backbones import BACKBONES, build_backbone
from contrastlab.models.cifar_resnet import CifarResNet, cifar_resnet
from contrastlab.models.cohort import Cohort, build_cohort
from contrastlab.models.ema import copy_params_, ema_update_, momentum_copy
from contrastlab.models.hcgnet import HCGNet, hcgnet
from contrastlab.models.heads import build_mlp
from contrastlab.models.prototypes import Prototypes
from contrastlab.models.shufflenetv2 import ShuffleNetV2, shufflenetv2
from contrastlab.models.staged import named_stages, run_stages, stage_names, upstream_shared_until
from contrastlab.models.wrn import WideResNet, wide_resnet

__all__ = [
    "BACKBONES",
    "CifarResNet",
    "Cohort",
    "HCGNet",
    "Prototypes",
    "ShuffleNetV2",
    "WideResNet",
    "build_backbone",
    "build_cohort",
    "build_mlp",
    "cifar_resnet",
    "copy_params_",
    "ema_update_",
    "hcgnet",
    "momentum_copy",
    "named_stages",
    "run_stages",
    "shufflenetv2",
    "stage_names",
    "upstream_shared_until",
    "wide_resnet",
]
