"""Models: backbones (torchvision and CIFAR ResNets), projection/prediction heads, EMA updates."""

from contrastlab.models.backbones import BACKBONES, build_backbone
from contrastlab.models.cifar_resnet import CifarResNet, cifar_resnet
from contrastlab.models.ema import copy_params_, ema_update_, momentum_copy
from contrastlab.models.heads import build_mlp

__all__ = [
    "BACKBONES",
    "CifarResNet",
    "build_backbone",
    "build_mlp",
    "cifar_resnet",
    "copy_params_",
    "ema_update_",
    "momentum_copy",
]
