"""Barlow Twins (Zbontar, Jing, Misra, LeCun, Deny, ICML 2021; facebookresearch/barlowtwins): pre-training, backbone
and linear-probe files.

Released layouts:

- pre-training (``main.py``'s ``checkpoint.pth``, written after every epoch; the README's "full checkpoint"):
  ``epoch`` (epochs completed), ``model`` (the DDP model: ``module.backbone.*``, a torchvision ResNet-50 whose ``fc``
  is an ``Identity``; ``module.projector.*``, the ``Sequential`` Linear-BN-ReLU-Linear-BN-ReLU-Linear, bias-free;
  ``module.bn.*``, the running statistics of the affine-free BatchNorm that standardises the embeddings) and
  ``optimizer``. The backbone and the projector are placed under the same names and indices in
  :class:`~contrastlab.methods.BarlowTwins`. The ``bn`` statistics are not carried over: training never reads them (it
  standardises with the batch's statistics) and our loss standardises without a module.
- backbone (``main.py``'s ``resnet50.pth`` after the last epoch; the README's "ResNet-50", ``torch.hub``): the
  torchvision ResNet-50's state dict without ``fc``, at the top level. Placed as the backbone; the projector keeps
  its fresh initialisation.
- linear probe (``evaluate.py``'s ``checkpoint.pth``): ``epoch``, ``best_acc`` (an ``argparse.Namespace``: such files
  load with ``--trust-pickle`` only), ``model`` (the DDP torchvision ResNet-50 with its ``fc``), ``optimizer`` and
  ``scheduler``. The backbone is placed, ``fc`` stored as the checkpoint's classifier (``eval linear
  --stored-classifier``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from contrastlab.errors import CheckpointError
from contrastlab.importers.base import (
    BACKBONE,
    LINEAR,
    PRETRAIN,
    Importer,
    Released,
    plain,
    probe_classifier,
    strip_module,
    upstream_epoch,
)
from contrastlab.importers.ccrop import _arch
from contrastlab.importers.mocov3 import LINEAR_ONLY, NOT_CARRIED, recipe_for_epochs
from contrastlab.importers.placement import Placement
from contrastlab.registry import register_importer

RECIPES = {300: "imagenet/barlow_twins_r50_300ep", 1000: "imagenet/barlow_twins_r50_1000ep"}
LOSS_BN = ("not carried over: the running statistics of main.py's affine-free BatchNorm on the embeddings "
           "(bn.running_mean, bn.running_var, bn.num_batches_tracked), which training never reads; contrastlab's loss "
           "standardises with the batch's statistics, without a module")
BACKBONE_ONLY = "not in a backbone file: as initialised when training starts"


@register_importer()
class BarlowTwinsImporter(Importer):
    """facebookresearch/barlowtwins ``.pth`` files (see the module docstring)."""

    name = "barlowtwins"
    project = "facebookresearch/barlowtwins"

    def recognise(self, raw: dict[str, Any], path: Path) -> Released:
        if isinstance(raw.get("model"), dict):
            other = {k: NOT_CARRIED.get(k, "kept in the imported record") for k in raw if k != "model"}
            state = strip_module(raw["model"])
            if any(k.startswith("backbone.") for k in state):
                if not any(k.startswith("projector.") for k in state):
                    raise CheckpointError(f"{path}: backbone.* without projector.*: not a Barlow Twins main.py file")
                other["model: bn.*"] = LOSS_BN
                state = {k: v for k, v in state.items() if not k.startswith("bn.")}
                return Released(path, raw, state, PRETRAIN, "main.py", upstream_epoch(raw),
                                _arch(state, "backbone.", path)[0], {}, other)
            if "fc.weight" in state:
                other["scheduler"] = "not carried over (evaluate.py's CosineAnnealingLR state)"
                info = {"best_acc": plain(raw["best_acc"])} if "best_acc" in raw else {}
                return Released(path, raw, state, LINEAR, "evaluate.py", upstream_epoch(raw), _arch(state, "", path)[0],
                                info, other)
            raise CheckpointError(f"{path}: 'model' holds neither main.py's model (module.backbone.*, "
                                  f"module.projector.*) nor evaluate.py's ResNet with fc; first keys: {list(state)[:5]}")
        if "conv1.weight" in raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
            state = strip_module(raw)
            if "fc.weight" in state:
                raise CheckpointError(f"{path}: a ResNet state dict with fc: not main.py's resnet50.pth (saved "
                                      "without fc); a classifier comes in evaluate.py's checkpoint.pth")
            return Released(path, raw, state, BACKBONE, "resnet50.pth", None, _arch(state, "", path)[0])
        raise CheckpointError(f"{path}: neither main.py's checkpoint.pth ('epoch', 'model', 'optimizer'), its "
                              f"resnet50.pth (a ResNet state dict) nor evaluate.py's checkpoint.pth; top-level keys "
                              f"found: {sorted(raw)[:8]}")

    def default_recipe(self, released: Released) -> str:
        if released.kind == PRETRAIN:
            return recipe_for_epochs(RECIPES, released.epoch)
        return RECIPES[1000]  # the released ResNet-50 and its probe: the 1000-epoch run

    def place(self, released: Released, placement: Placement) -> None:
        if released.kind == PRETRAIN:
            placement.put_prefix("backbone.", "backbone.")
            placement.put_prefix("projector.", "projector.")
            return
        if released.kind == LINEAR:
            placement.take("fc.weight", "classifier")
            placement.take("fc.bias", "classifier")
        placement.put_prefix("", "backbone.")
        placement.keep_initial("projector.*", LINEAR_ONLY if released.kind == LINEAR else BACKBONE_ONLY)

    def classifier(self, released: Released) -> dict[str, torch.Tensor] | None:
        return probe_classifier(released)
