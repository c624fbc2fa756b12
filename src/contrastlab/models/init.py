"""Weight initialisation shared by the ResNet-family backbones."""

from __future__ import annotations

from torch import nn


def kaiming_init_(net: nn.Module) -> None:
    """He-normal (fan-out, ReLU gain) convolutions and unit-scale, zero-shift BatchNorm, as torchvision's ResNet.

    He, Zhang, Ren, Sun, "Delving Deep into Rectifiers", ICCV 2015.
    """
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
