"""MoCo v3 (Chen, Xie, He, ICCV 2021; facebookresearch/moco-v3): pre-training and linear-probe files.

Released layouts (``main_moco.py`` / ``main_lincls.py`` save a dictionary with ``epoch``, ``arch``,
``state_dict`` and ``optimizer``; pre-training also ``scaler``, the probe ``best_acc1``):

- pre-training (``r-50-100ep.pth.tar``, ``vit-s-300ep.pth.tar``, ``checkpoint_NNNN.pth.tar``): the DDP model,
  ``module.base_encoder.*`` (torchvision ResNet-50 whose ``fc``, or timm ViT whose ``head``, is the projector),
  ``module.momentum_encoder.*`` (the same, the momentum copy) and ``module.predictor.*``. Placed as
  ``backbone``, ``projector``, ``key_encoder.0`` / ``key_encoder.1`` and ``predictor`` of
  :class:`~contrastlab.methods.MoCoV3`; the projector and predictor MLPs have the same layer order and
  indices as ours (bias-free Linears, BatchNorms, the last without affine parameters). ``epoch`` is the number
  of epochs completed.
- linear probe (``linear-100ep.pth.tar``, ``linear-vit-s-300ep.pth.tar``): ``module.<backbone>`` and the
  classifier ``module.fc`` / ``module.head``. The backbone is placed; the classifier is stored in the
  checkpoint's ``classifier`` entry (``contrastlab eval linear --stored-classifier`` reports its accuracy);
  the projector and predictor, absent from the file, keep their fresh initialisation and the momentum encoder
  starts as a copy of the backbone, as at the start of training.

- DeiT format (``{"model": ...}``, no ``state_dict``): a timm ViT under its own names. ``convert_to_deit.py``
  writes the pre-trained base encoder without its projector (``head`` removed): the backbone is placed, the rest
  starts as for a linear-probe file. facebookresearch/deit's ``main.py`` fine-tunes it and saves ``model`` (the ViT
  and its classification ``head``), ``model_ema``, ``optimizer``, ``lr_scheduler``, ``scaler``, ``epoch`` (the
  last epoch's index) and ``args`` (an ``argparse.Namespace``: such files need ``--trust-pickle``). The fine-tuned
  ViT is placed as the backbone and its ``head`` stored as the checkpoint's classifier, so ``eval linear
  --stored-classifier`` reports the fine-tuned network's top-1 and ``eval knn`` its features. DeiT's EMA of the
  weights (which its evaluation does not use), optimizer, scheduler and scaler states are not carried over:
  continuing DeiT's run (``eval finetune --resume``) would need its AdamW moments in timm's parameter order, and
  ``eval finetune`` on such a checkpoint starts a new fine-tuning with a fresh head (a transfer to another
  dataset).

The optimizer and loss-scaler states are not carried over (their parameter order is upstream's); the log and
the checkpoint's ``imported`` record say so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from contrastlab.errors import CheckpointError
from contrastlab.importers.base import (
    BACKBONE,
    LINEAR,
    OPTIMIZER_NOT_CARRIED,
    PRETRAIN,
    Importer,
    Released,
    plain,
    probe_classifier,
    state_under,
    upstream_epoch,
)
from contrastlab.importers.placement import Placement
from contrastlab.registry import register_importer

NOT_CARRIED = {"optimizer": OPTIMIZER_NOT_CARRIED,
               "scaler": "not carried over (fp16 loss scale; contrastlab trains in bf16 or fp32)"}
LINEAR_ONLY = "not in a linear-probe file: as initialised when training starts"
DEIT_ENTRIES = {"model_ema": "not carried over: DeiT's EMA of the fine-tuned weights, which its evaluation does not use",
                "lr_scheduler": "not carried over (DeiT's timm scheduler state)",
                "args": "kept in the imported record (as text)"}
VIT_WIDTHS = {384: "vit_small", 768: "vit_base"}


def recipe_for_epochs(recipes: dict[int, str], epochs: int | None) -> str:
    """The recipe of the shortest run that reaches ``epochs`` (an intermediate checkpoint belongs to a longer run
    than its epoch; unknown: the shortest run)."""
    fitting = [e for e in sorted(recipes) if epochs is not None and e >= epochs]
    return recipes[fitting[0] if fitting else (max(recipes) if epochs is not None else min(recipes))]


@register_importer()
class MoCoV3Importer(Importer):
    """facebookresearch/moco-v3 ``.pth.tar`` files (see the module docstring)."""

    name = "mocov3"
    project = "facebookresearch/moco-v3"
    resnet_recipes: ClassVar[dict[int, str]] = {100: "imagenet/mocov3_r50_100ep", 300: "imagenet/mocov3_r50_300ep",
                      1000: "imagenet/mocov3_r50_1000ep"}
    vit_recipes: ClassVar[dict[str, str]] = {"vit_small": "imagenet/mocov3_vit_s_300ep", "vit_base": "imagenet/mocov3_vit_b_300ep",
                   "vit_conv_small": "imagenet/mocov3_vit_s_300ep", "vit_conv_base": "imagenet/mocov3_vit_b_300ep"}

    def recognise(self, raw: dict[str, Any], path: Path) -> Released:
        if "state_dict" not in raw and isinstance(raw.get("model"), dict):
            return self._deit(raw, path)
        if not isinstance(raw.get("state_dict"), dict):
            raise CheckpointError(f"{path}: MoCo v3's files hold their weights under 'state_dict' (main_moco.py, "
                                  f"main_lincls.py) or 'model' (DeiT format); top-level keys found: {sorted(raw)}")
        state = state_under(raw, "state_dict", path)
        vit = "base_encoder.cls_token" in state or "cls_token" in state
        arch = raw.get("arch") if isinstance(raw.get("arch"), str) else None
        other = {k: NOT_CARRIED.get(k, "kept in the imported record") for k in raw if k != "state_dict"}
        info = {k: plain(raw[k]) for k in ("best_acc1",) if k in raw}
        if any(k.startswith("base_encoder.") for k in state):
            if not any(k.startswith("momentum_encoder.") for k in state):
                raise CheckpointError(f"{path}: base_encoder.* without momentum_encoder.*: not a MoCo v3 training file")
            return Released(path, raw, state, PRETRAIN, "vit" if vit else "resnet", upstream_epoch(raw),
                            arch or ("vit_small" if vit else "resnet50"), info, other)
        head = "head" if vit else "fc"
        if f"{head}.weight" in state:
            return Released(path, raw, state, LINEAR, "vit" if vit else "resnet", upstream_epoch(raw),
                            arch or ("vit_small" if vit else "resnet50"), info, other)
        raise CheckpointError(f"{path}: neither a MoCo v3 pre-training file (module.base_encoder.*, "
                              "module.momentum_encoder.*, module.predictor.*) nor a linear-probe file (backbone + "
                              f"fc/head); first keys: {list(state)[:5]}")

    def _deit(self, raw: dict[str, Any], path: Path) -> Released:
        """A DeiT-format file: ``convert_to_deit.py``'s backbone, or DeiT's fine-tuned ViT with its head."""
        state = state_under(raw, "model", path)
        if "cls_token" not in state or "pos_embed" not in state:
            raise CheckpointError(f"{path}: a DeiT-format file holds a timm ViT under 'model' (cls_token, pos_embed, "
                                  f"blocks.*); first keys: {list(state)[:5]}")
        width = int(state["cls_token"].shape[-1])
        if width not in VIT_WIDTHS:
            raise CheckpointError(f"{path}: a ViT of width {width}; MoCo v3's ViTs are {', '.join(VIT_WIDTHS.values())}")
        arch = VIT_WIDTHS[width].replace("vit_", "vit_conv_") if "patch_embed.proj.weight" not in state \
            else VIT_WIDTHS[width]
        tuned = "head.weight" in state
        other = {k: DEIT_ENTRIES.get(k) or NOT_CARRIED.get(k, "kept in the imported record") for k in raw
                 if k != "model"}
        info = {k: plain(raw[k]) for k in ("args",) if k in raw}
        epoch = upstream_epoch(raw, completed_offset=1)
        return Released(path, raw, state, LINEAR if tuned else BACKBONE, "deit", epoch, arch, info, other)

    def default_recipe(self, released: Released) -> str:
        if released.layout in ("vit", "deit"):
            if released.arch not in self.vit_recipes:
                raise CheckpointError(f"{released.path}: arch {released.arch!r} is not one of MoCo v3's ViTs "
                                      f"({', '.join(self.vit_recipes)})")
            return self.vit_recipes[released.arch]
        return recipe_for_epochs(self.resnet_recipes, released.epoch if released.kind == PRETRAIN else None)

    def overrides(self, released: Released) -> list[str]:
        extra = ["model.stop_grad_conv1=false"] if (released.arch or "").startswith("vit_conv") else []
        return super().overrides(released) + extra

    def place(self, released: Released, placement: Placement) -> None:
        head = "head" if released.layout in ("vit", "deit") else "fc"
        if released.kind == PRETRAIN:
            placement.put_prefix(f"base_encoder.{head}.", "projector.")
            placement.put_prefix("base_encoder.", "backbone.")
            placement.put_prefix(f"momentum_encoder.{head}.", "key_encoder.1.")
            placement.put_prefix("momentum_encoder.", "key_encoder.0.")
            placement.put_prefix("predictor.", "predictor.")
            return
        if released.kind == LINEAR:
            placement.take(f"{head}.weight", "classifier")
            placement.take(f"{head}.bias", "classifier")
        placement.put_prefix("", "backbone.")
        placement.keep_initial("projector.*", LINEAR_ONLY)
        placement.keep_initial("predictor.*", LINEAR_ONLY)
        placement.copy_ours("backbone.", "key_encoder.0.", "not in a linear-probe file: a copy of the backbone, as "
                            "the momentum encoder starts")
        placement.copy_ours("projector.", "key_encoder.1.", "not in a linear-probe file: a copy of the projector, as "
                            "the momentum encoder starts")

    def classifier(self, released: Released) -> dict[str, torch.Tensor] | None:
        return probe_classifier(released, "head" if released.layout in ("vit", "deit") else "fc")
