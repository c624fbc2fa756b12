"""VICReg (Bardes, Ponce, LeCun, ICLR 2022; facebookresearch/vicreg): the released ResNet-50 files.

Released layouts (README, "Pre-trained Models"; written by ``main_vicreg.py``):

- backbone only (``resnet50.pth``, ``torch.save(model.module.backbone.state_dict())``): the ResNet of the
  release's ``resnet.py``, whose parameter names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
  ``downsample.0``/``.1``) with no ``fc``; its extra zero padding before ``conv1`` (padding 2 instead of 3) holds
  no weights and gives torchvision's outputs. Placed under ``backbone.``; the expander keeps its fresh
  initialisation.
- full checkpoint (``resnet50_fullckpt.pth``, the training checkpoint ``model.pth``): ``epoch`` (epochs
  completed), ``model`` (the DDP model: ``module.backbone.*`` and ``module.projector.*``, the expander
  ``Linear(bias)-BN-ReLU-Linear(bias)-BN-ReLU-Linear(no bias)`` at our indices 0, 1, 3, 4, 6) and ``optimizer``.
  Our hidden Linears have no bias: each released bias is folded into the running mean of the BatchNorm after it
  (:meth:`~contrastlab.importers.placement.Placement.fold_bias`), which gives the same outputs in training and in
  evaluation.

The ResNet-50 x2 and ResNet-200 x2 files need backbones contrastlab does not build: their conversion stops at the
first tensor whose shape differs from ResNet-50's, naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from contrastlab.errors import CheckpointError
from contrastlab.importers.base import (
    BACKBONE,
    OPTIMIZER_NOT_CARRIED,
    PRETRAIN,
    Importer,
    Released,
    state_under,
    strip_module,
    upstream_epoch,
)
from contrastlab.importers.placement import Placement
from contrastlab.registry import register_importer

RECIPE = "imagenet/vicreg_r50_1000ep"
BACKBONE_ONLY = "not in a backbone-only file: as initialised when training starts"


@register_importer()
class VICRegImporter(Importer):
    """facebookresearch/vicreg ``.pth`` files (see the module docstring)."""

    name = "vicreg"
    project = "facebookresearch/vicreg"

    def recognise(self, raw: dict[str, Any], path: Path) -> Released:
        if isinstance(raw.get("model"), dict):
            state = state_under(raw, "model", path)
            if not any(k.startswith("backbone.") for k in state) or not any(k.startswith("projector.") for k in state):
                raise CheckpointError(f"{path}: a VICReg training checkpoint holds module.backbone.* and "
                                      f"module.projector.* under 'model'; first keys: {list(state)[:5]}")
            other = {k: OPTIMIZER_NOT_CARRIED if k == "optimizer" else "kept in the imported record" for k in raw
                     if k != "model"}
            return Released(path, raw, state, PRETRAIN, "full", upstream_epoch(raw), "resnet50", {}, other)
        if "conv1.weight" in raw and "layer4.0.conv1.weight" in raw:
            return Released(path, raw, strip_module(raw), BACKBONE, "backbone", None, "resnet50")
        raise CheckpointError(f"{path}: neither VICReg's backbone file (conv1.*, layer1-4.*; resnet50.pth) nor its "
                              f"training checkpoint (epoch, model, optimizer; resnet50_fullckpt.pth); top-level keys: "
                              f"{sorted(raw)[:8]}")

    def default_recipe(self, released: Released) -> str:
        return RECIPE

    def place(self, released: Released, placement: Placement) -> None:
        if released.kind == BACKBONE:
            placement.put_prefix("", "backbone.")
            placement.keep_initial("projector.*", BACKBONE_ONLY)
            return
        placement.put_prefix("backbone.", "backbone.")
        linears = sorted({int(k.split(".")[1]) for k in placement.keys("projector.")
                          if k.endswith(".weight") and placement.source[k].dim() == 2})
        for index in linears:
            linear = f"projector.{index}"
            if placement.has(f"{linear}.bias") and placement.has(f"projector.{index + 1}.running_mean"):
                bn = f"projector.{index + 1}"
                placement.fold_bias(linear, bn, linear, bn)
            else:
                placement.put_prefix(f"{linear}.", f"{linear}.")

