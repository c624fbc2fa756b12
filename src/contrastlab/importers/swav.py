"""SwAV (Caron et al., NeurIPS 2020; facebookresearch/swav): pre-training files and ``eval_linear.py``'s classifier.

Released layouts:

- the model zoo's ``swav_{100,200,400,800}ep_pretrain.pth.tar``, ``swav_{200,400}ep_bs256_pretrain.pth.tar`` and
  ``swav_400ep_2x224_pretrain.pth.tar`` (what ``hubconf.py`` loads): the DDP model's state dict itself, flat:
  ``module.conv1.*`` ... ``module.layer4.*`` (``src/resnet50.py``, torchvision's names; its ``padding`` layer holds
  no weights), ``module.projection_head.{0,1,3}.*`` (Linear with a bias, BatchNorm, Linear) and
  ``module.prototypes.weight``;
- ``main_swav.py``'s ``checkpoint.pth.tar`` and ``ckp-<epoch>.pth``: ``epoch`` (epochs completed), ``state_dict``
  (the same weights), ``optimizer`` and ``amp`` (not carried over). The queue is saved apart, one
  ``queue<rank>.pth`` per GPU, and is not read: ours starts empty and refills from ``epoch_queue_starts``;
- ``eval_linear.py``'s ``checkpoint.pth.tar`` (``swav_800ep_eval_linear.pth.tar``): the classifier alone
  (``state_dict``: ``module.linear.weight`` / ``bias`` on the pooled features), ``epoch``, ``optimizer``,
  ``scheduler`` and ``best_acc``: passed with ``--classifier FILE`` beside the pre-training file, it becomes the
  checkpoint's stored classifier.

Placement into :class:`~contrastlab.methods.SwAV`: ``backbone`` from the ResNet's keys; ``projector.0`` /
``projector.1`` from ``projection_head.0`` / ``projection_head.1``, the Linear's bias folded into the BatchNorm's
running mean (:meth:`~contrastlab.importers.placement.Placement.fold_bias`: our hidden Linear has none);
``projector.3`` from ``projection_head.3``; ``prototypes.weight`` as it is. The recipe follows the file's name
(``bs256``, ``2x224`` and the epochs) or its ``epoch``; else ``imagenet/swav_r50_800ep``, the model ``hubconf.py``
loads. The wide ResNet-50s (RN50-w2/w4/w5) are refused: the backbone zoo has no wide ResNet-50.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from contrastlab.errors import CheckpointError
from contrastlab.importers.base import (
    OPTIMIZER_NOT_CARRIED,
    PRETRAIN,
    Importer,
    Released,
    eval_linear_classifier,
    plain,
    state_under,
    strip_module,
    upstream_epoch,
)
from contrastlab.importers.mocov3 import recipe_for_epochs
from contrastlab.importers.placement import Placement
from contrastlab.registry import register_importer

RECIPES = {e: f"imagenet/swav_r50_{e}ep" for e in (100, 200, 400, 800)}
BS256_RECIPES = {e: f"imagenet/swav_r50_{e}ep_bs256" for e in (200, 400)}
NOT_CARRIED = {"optimizer": OPTIMIZER_NOT_CARRIED, "amp": "not carried over (apex mixed-precision state)"}
HEAD = ("projection_head.", "prototypes.")


@register_importer()
class SwAVImporter(Importer):
    """facebookresearch/swav files (see the module docstring)."""

    name = "swav"
    project = "facebookresearch/swav"

    def recognise(self, raw: dict[str, Any], path: Path) -> Released:
        if isinstance(raw.get("state_dict"), dict):
            state = state_under(raw, "state_dict", path)
            other = {k: NOT_CARRIED.get(k, "kept in the imported record") for k in raw if k != "state_dict"}
        else:  # the model zoo: the state dict itself
            state, other = strip_module(raw), {}
        if set(state) == {"linear.weight", "linear.bias"}:
            raise CheckpointError(f"{path} is an eval_linear.py file (the classifier alone): pass it with --classifier "
                                  "beside the pre-training file it was trained on")
        if "prototypes.weight" not in state or "projection_head.0.weight" not in state:
            raise CheckpointError(f"{path}: a SwAV pre-training file holds a ResNet with projection_head.* and "
                                  f"prototypes.weight (flat, or under 'state_dict'); first keys: {list(state)[:5]}")
        stem = state.get("conv1.weight")
        arch = None
        if stem is not None and "layer1.0.conv3.weight" in state:
            if stem.shape[0] != 64:
                raise CheckpointError(f"{path}: a ResNet-50 widened x{stem.shape[0] // 64} (conv1 has {stem.shape[0]} "
                                      "channels); the backbone zoo has no wide ResNet-50")
            arch = "resnet50"
        info = {k: plain(raw[k]) for k in ("epoch",) if k in raw}
        return Released(path, raw, state, PRETRAIN, "resnet", upstream_epoch(raw), arch, info, other)

    def default_recipe(self, released: Released) -> str:
        name = released.path.name
        named = re.search(r"(\d+)ep", name)
        epochs = released.epoch if released.epoch is not None else (int(named.group(1)) if named else None)
        if "2x224" in name:
            return "imagenet/swav_r50_400ep_2x224"
        if "bs256" in name:
            return recipe_for_epochs(BS256_RECIPES, epochs)
        return recipe_for_epochs(RECIPES, epochs) if epochs is not None else RECIPES[800]

    def place(self, released: Released, placement: Placement) -> None:
        placement.put_prefix("", "backbone.", skip=HEAD)
        placement.fold_bias("projection_head.0", "projection_head.1", "projector.0", "projector.1")
        placement.put_prefix("projection_head.3.", "projector.3.")
        placement.put("prototypes.weight", "prototypes.weight")
        placement.keep_initial("queue", "not in the file (main_swav.py saves each GPU's queue in queue<rank>.pth): "
                               "empty, refilled from method.epoch_queue_starts")

    def classifier_file(self, raw: dict[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``eval_linear.py``'s file (``RegLog`` with ``use_bn`` false: ``module.linear.weight`` and ``bias``)."""
        return eval_linear_classifier(raw, path)
