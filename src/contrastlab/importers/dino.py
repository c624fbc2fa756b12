"""DINO (Caron et al., ICCV 2021; facebookresearch/dino): full training checkpoints and backbone-only files.

Released layouts:

- full checkpoint (``*_full_checkpoint.pth``, ``checkpoint.pth`` / ``checkpointNNNN.pth`` of ``main_dino.py``):
  ``student`` (the DDP ``MultiCropWrapper``: ``module.backbone.*``, ``module.head.*``), ``teacher`` (the same
  without ``module.``, or with it where the teacher was DDP-wrapped for SyncBN), ``dino_loss`` (``center``),
  ``optimizer``, ``epoch`` (epochs completed), ``args`` (an ``argparse.Namespace``: such files need
  ``--trust-pickle``) and, with fp16, ``fp16_scaler``. Placed as ``backbone`` / ``head`` (student),
  ``teacher_backbone`` / ``teacher_head`` and ``criterion.center`` of :class:`~contrastlab.methods.DINO`, whose
  names are upstream's (``head.mlp.<i>``, ``head.last_layer.weight_g`` / ``weight_v``). The head's sizes (``K``,
  hidden and bottleneck widths, depth, BatchNorm) are read from the tensors and set as ``method.*`` overrides.
- ``eval_linear.py``'s classifier (``dino_deitsmall16_linearweights.pth``, ...): ``state_dict`` with one ``Linear``;
  passed with ``--classifier FILE`` beside the backbone it was trained on, it becomes the checkpoint's stored
  classifier (``contrastlab eval linear --stored-classifier``, on the recipe's last-blocks features).
- backbone only (``dino_deitsmall16_pretrain.pth``, ``dino_vitbase16_pretrain.pth``,
  ``dino_resnet50_pretrain.pth``): the teacher's backbone as a flat state dict (timm's ViT names; torchvision's
  ResNet-50 without ``fc``), the network ``eval_knn.py`` and ``eval_linear.py`` evaluate. Placed as ``backbone``
  (so the kNN monitor, the linear probe and export evaluate it) and copied into ``teacher_backbone``; the heads and
  the centre keep their initial values.

ViTs with 8-pixel patches (ViT-S/8, ViT-B/8) and XCiT are not in contrastlab's zoo: such files are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from contrastlab.errors import CheckpointError
from contrastlab.importers.base import (
    BACKBONE,
    OPTIMIZER_NOT_CARRIED,
    PRETRAIN,
    Importer,
    Released,
    eval_linear_classifier,
    strip_module,
    upstream_epoch,
)
from contrastlab.importers.mocov3 import recipe_for_epochs
from contrastlab.importers.placement import Placement
from contrastlab.registry import register_importer

VIT_WIDTHS = {192: "vit_tiny_dino", 384: "vit_small_dino", 768: "vit_base_dino"}
NOT_CARRIED = {"optimizer": OPTIMIZER_NOT_CARRIED,
               "fp16_scaler": "not carried over (fp16 loss scale; contrastlab trains in bf16 or fp32)",
               "args": "kept in the imported record (as text)"}
NO_HEAD = "not in a backbone-only file: as initialised when training starts"


def _arch(state: dict[str, Any], path: Path) -> str:
    """The zoo name of the backbone whose (prefix-free) weights are ``state``."""
    if "cls_token" in state:
        patch = state["patch_embed.proj.weight"].shape[-1] if "patch_embed.proj.weight" in state else None
        width = int(state["cls_token"].shape[-1])
        if patch != 16 or width not in VIT_WIDTHS:
            raise CheckpointError(f"{path}: a ViT of width {width} with {patch}-pixel patches; contrastlab has DINO's "
                                  f"ViT-Ti/S/B with 16-pixel patches ({', '.join(VIT_WIDTHS.values())})")
        return VIT_WIDTHS[width]
    if "conv1.weight" in state and "layer4.2.conv3.weight" in state and "layer3.5.conv3.weight" in state:
        return "resnet50"
    raise CheckpointError(f"{path}: neither a ViT (cls_token, pos_embed, blocks.*) nor a ResNet-50 (conv1, layer1-4 "
                          f"with Bottleneck blocks); first keys: {list(state)[:5]}")


def _under(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def head_overrides(state: dict[str, Any]) -> list[str]:
    """``method.*`` overrides giving our head the shapes of the released head (``state`` under ``head.``)."""
    linears = sorted(int(k.split(".")[1]) for k in state if k.startswith("mlp.") and k.endswith(".weight")
                     and state[k].ndim == 2)
    one_layer = "mlp.weight" in state
    use_bn = any(k.endswith("running_mean") for k in state)
    out_dim, bottleneck = state["last_layer.weight_v"].shape
    hidden = int(state["mlp.0.weight"].shape[0]) if linears else int(bottleneck)
    layers = 1 if one_layer else len(linears)
    return [f"method.out_dim={int(out_dim)}", f"method.bottleneck_dim={int(bottleneck)}", f"method.hidden_dim={hidden}",
            f"method.head_layers={layers}", f"method.use_bn_in_head={'true' if use_bn else 'false'}"]


@register_importer()
class DINOImporter(Importer):
    """facebookresearch/dino ``.pth`` files (see the module docstring)."""

    name = "dino"
    project = "facebookresearch/dino"
    vit_recipes: ClassVar[dict[int, str]] = {100: "imagenet/dino_vit_s16_100ep", 300: "imagenet/dino_vit_s16_300ep",
                                             800: "imagenet/dino_vit_s16_800ep"}
    resnet_recipe: ClassVar[str] = "imagenet/dino_r50_100ep"

    def recognise(self, raw: dict[str, Any], path: Path) -> Released:
        linear = raw.get("state_dict")
        if isinstance(linear, dict) and set(strip_module(linear)) == {"linear.weight", "linear.bias"}:
            raise CheckpointError(f"{path} is an eval_linear.py file (the classifier alone): pass it with --classifier "
                                  "beside the pre-training file it was trained on")
        if isinstance(raw.get("student"), dict) and isinstance(raw.get("teacher"), dict):
            student, teacher = strip_module(raw["student"]), strip_module(raw["teacher"])
            state = {**{f"student.{k}": v for k, v in student.items()},
                     **{f"teacher.{k}": v for k, v in teacher.items()}}
            loss = raw.get("dino_loss")
            if isinstance(loss, dict) and "center" in loss:
                state["dino_loss.center"] = loss["center"]
            if not any(k.startswith("student.head.last_layer.") for k in state):
                raise CheckpointError(f"{path}: 'student' holds no DINO head (head.last_layer.*): not a main_dino.py "
                                      f"checkpoint; first keys: {list(student)[:5]}")
            arch = _arch(_under(student, "backbone."), path)
            other = {k: NOT_CARRIED.get(k, "kept in the imported record") for k in raw
                     if k not in ("student", "teacher", "dino_loss")}
            return Released(path, raw, state, PRETRAIN, "vit" if arch != "resnet50" else "resnet",
                            upstream_epoch(raw), arch, {}, other)
        if raw and all(hasattr(v, "shape") for v in raw.values()):
            state = strip_module(raw)
            arch = _arch(state, path)
            return Released(path, raw, state, BACKBONE, "vit" if arch != "resnet50" else "resnet", None, arch)
        raise CheckpointError(f"{path}: neither a main_dino.py checkpoint ('student', 'teacher', 'dino_loss', ...) nor "
                              f"a backbone-only file (a flat state dict); top-level keys found: {sorted(raw)[:8]}")

    def classifier_file(self, raw: dict[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``eval_linear.py``'s file (``*_linearweights.pth``: ``LinearClassifier``'s ``module.linear.weight`` and
        ``bias``) on the features the recipe's ``linear.n_last_blocks`` / ``avgpool_patch_tokens`` read (ViT-S: the
        last 4 class tokens, 1536 features)."""
        return eval_linear_classifier(raw, path)

    def default_recipe(self, released: Released) -> str:
        if released.arch == "resnet50":
            return self.resnet_recipe
        return recipe_for_epochs(self.vit_recipes, released.epoch if released.epoch is not None else 800)

    def overrides(self, released: Released) -> list[str]:
        extra = head_overrides(_under(released.state, "student.head.")) if released.kind == PRETRAIN else []
        return [*super().overrides(released), *extra]

    def place(self, released: Released, placement: Placement) -> None:
        if released.kind == PRETRAIN:
            placement.put_prefix("student.backbone.", "backbone.")
            placement.put_prefix("student.head.", "head.")
            placement.put_prefix("teacher.backbone.", "teacher_backbone.")
            placement.put_prefix("teacher.head.", "teacher_head.")
            if placement.has("dino_loss.center"):
                placement.put("dino_loss.center", "criterion.center")
            else:
                placement.keep_initial("criterion.center", "no dino_loss entry in the file: the centre starts at zero")
            return
        placement.put_prefix("", "backbone.")
        placement.copy_ours("backbone.", "teacher_backbone.", "not in a backbone-only file: a copy of the backbone, "
                            "as the teacher starts")
        placement.keep_initial("head.*", NO_HEAD)
        placement.keep_initial("teacher_head.*", NO_HEAD)
        placement.keep_initial("criterion.center", NO_HEAD)
