"""ContrastiveCrop (Peng et al., CVPR 2022; xyupeng/ContrastiveCrop): pre-training and linear-probe files.

Released layouts (``DDP_<method>_ccrop.py`` save ``epoch_N.pth`` every ``save_interval`` epochs and ``last.pth``;
``DDP_linear.py`` saves ``best_<cfg>.pth``). Backbones are the repository's ``models/resnet.py`` ResNets, named
as torchvision's (``conv1``, ``bn1``, ``layerN.M.*``, ``downsample``); CIFAR configs have a 3x3 stride-1 stem and
no max-pool (our ``model.cifar_stem=true``):

- ``moco_state`` (MoCo v1/v2): ``module.encoder_q.*`` / ``module.encoder_k.*`` with ``fc`` either one Linear
  (v1) or ``Linear-ReLU-Linear`` with biases (v2, ``mlp=True``), ``module.queue`` ``[dim, K]`` and
  ``module.queue_ptr``. Placed in :class:`~contrastlab.methods.MoCo` with ``method.proj_hidden_bn=false`` (v2)
  or ``method.proj_layers=1`` (v1); the queue transposed to our ``[K, dim]``.
- ``simclr_state``: the ResNet with ``fc`` = ``Linear-ReLU-Linear`` with biases, placed in
  :class:`~contrastlab.methods.SimCLR` with ``method.proj_hidden_bn=false``.
- ``byol_state``: ``encoder_q`` / ``encoder_k`` with ``fc`` = Linear (with bias) - BN - ReLU - Linear, and a
  predictor of the same shape. Our BYOL heads have no bias before a BatchNorm; that bias is folded into the
  BatchNorm's running mean (:meth:`~contrastlab.importers.placement.Placement.fold_bias`, exact).
- ``simsiam_state``: ``encoder`` with the 3-layer projector whose last Linear keeps a (frozen) bias before the
  affine-free BatchNorm: folded the same way; the predictor maps as it is.
- ``boxes``: the per-image boxes, ``(h_min, w_min, h_max, w_max)`` normalised, become our box store's
  ``(x0, y0, x1, y1)`` rows (enabled once the file's epoch reaches the recipe's ``views.box_warmup_epochs``,
  as upstream's ``use_box``), so ``train ... resume=FILE`` continues with them.
- linear probe: ``model_state`` with ``module.<ResNet>`` and ``module.fc`` (the classifier, stored in the
  checkpoint's ``classifier`` entry). Which method pre-trained the backbone is not recorded: the recipe is
  SimCLR's (ResNet-18) or MoCo v2's (ResNet-50) of the dataset with that many classes; the heads keep their
  fresh initialisation.

``epoch`` in these files counts completed epochs. ``optimizer_state`` is not carried over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from contrastlab.errors import CheckpointError
from contrastlab.importers.base import (
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
from contrastlab.importers.mocov3 import LINEAR_ONLY
from contrastlab.importers.placement import Placement
from contrastlab.registry import register_importer

METHOD_STATES = {"moco_state": "moco", "simclr_state": "simclr", "byol_state": "byol", "simsiam_state": "simsiam"}
"""Top-level key of a pre-training file -> the method that wrote it."""

NOT_CARRIED = OPTIMIZER_NOT_CARRIED

LINEAR_RECIPES = {10: "cifar10/simclr_ccrop_r18_500ep", 100: "cifar100/simclr_ccrop_r18_500ep",
                  200: "tiny_imagenet/simclr_ccrop_r18_500ep", 1000: "imagenet/mocov2_ccrop_r50_100ep"}
"""Classes of a linear-probe file's classifier -> the recipe of its dataset (STL-10, also 10 classes: --recipe)."""


def _arch(state: dict[str, torch.Tensor], prefix: str, path: Path) -> tuple[str, bool]:
    """(torchvision ResNet name, CIFAR stem) of the ResNet under ``prefix``."""
    conv1 = state.get(f"{prefix}conv1.weight")
    if conv1 is None:
        raise CheckpointError(f"{path}: no {prefix}conv1.weight; not a ContrastiveCrop ResNet")
    bottleneck = f"{prefix}layer1.0.conv3.weight" in state
    blocks = len({k[len(prefix):].split(".")[1] for k in state if k.startswith(f"{prefix}layer3.")})
    depth = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50"}.get((bottleneck, blocks))
    if depth is None:
        raise CheckpointError(f"{path}: a ResNet with {blocks} blocks in layer3 ({'Bottleneck' if bottleneck else 'Basic'}"
                              "Block) is not one of resnet18 / resnet34 / resnet50")
    return depth, conv1.shape[-1] == 3


def place_fc(placement: Placement, src: str, dst: str) -> None:
    """``fc`` as MoCo builds it: one Linear (v1: ``fc.weight``) or ``Linear-ReLU-Linear`` (v2: ``fc.0``, ``fc.2``),
    into our projector (``proj_layers=1``: ``projector.0``; ``proj_hidden_bn=false``: ``projector.0``, ``.2``)."""
    if placement.has(f"{src}.weight"):
        placement.put(f"{src}.weight", f"{dst}.0.weight")
        placement.put(f"{src}.bias", f"{dst}.0.bias")
    else:
        placement.put_prefix(f"{src}.", f"{dst}.")


def place_moco(placement: Placement) -> None:
    """The MoCo v1/v2 model of facebookresearch/moco's ``builder.py`` (which ContrastiveCrop adapts): ``encoder_q``,
    ``encoder_k`` (ResNets whose ``fc`` is the head), ``queue`` ``[dim, K]`` and ``queue_ptr``, into
    :class:`~contrastlab.methods.MoCo` (queue transposed to ``[K, dim]``)."""
    place_fc(placement, "encoder_q.fc", "projector")
    placement.put_prefix("encoder_q.", "backbone.")
    place_fc(placement, "encoder_k.fc", "key_encoder.1")
    placement.put_prefix("encoder_k.", "key_encoder.0.")
    placement.put("queue", "queue.queue", transform=lambda q: q.t().contiguous())
    placement.put("queue_ptr", "queue.ptr", transform=lambda p: p.reshape(()))


@register_importer()
class ContrastiveCropImporter(Importer):
    """xyupeng/ContrastiveCrop ``.pth`` files (see the module docstring)."""

    name = "ccrop"
    project = "xyupeng/ContrastiveCrop"

    def recognise(self, raw: dict[str, Any], path: Path) -> Released:
        found = [k for k in METHOD_STATES if k in raw]
        info = {k: plain(raw[k]) for k in ("acc",) if k in raw}
        if found:
            state = state_under(raw, found[0], path)
            method = METHOD_STATES[found[0]]
            prefix = {"moco": "encoder_q.", "byol": "encoder_q.", "simsiam": "encoder.", "simclr": ""}[method]
            arch, cifar_stem = _arch(state, prefix, path)
            other = {k: "placed in the box store" if k == "boxes" else NOT_CARRIED if k == "optimizer_state"
                     else "kept in the imported record" for k in raw if k != found[0]}
            released = Released(path, raw, state, PRETRAIN, method, upstream_epoch(raw), arch, info, other)
            released.info["cifar_stem"] = cifar_stem
            return released
        if "model_state" in raw:
            state = state_under(raw, "model_state", path)
            if "fc.weight" not in state:
                raise CheckpointError(f"{path}: model_state without fc.weight: not a DDP_linear.py file")
            arch, cifar_stem = _arch(state, "", path)
            other = {k: NOT_CARRIED if k == "optimizer_state" else "kept in the imported record" for k in raw
                     if k != "model_state"}
            released = Released(path, raw, state, LINEAR, "linear", upstream_epoch(raw), arch, info, other)
            released.info["cifar_stem"] = cifar_stem
            return released
        raise CheckpointError(f"{path}: no {', '.join(METHOD_STATES)} (pre-training) or model_state (linear probe); "
                              f"top-level keys found: {sorted(raw)}")

    def _mlp_head(self, released: Released, prefix: str) -> bool:
        return f"{prefix}fc.2.weight" in released.state

    def default_recipe(self, released: Released) -> str:
        if released.kind == LINEAR:
            classes = released.state["fc.weight"].shape[0]
            if classes not in LINEAR_RECIPES:
                raise CheckpointError(f"{released.path}: a {classes}-class classifier matches none of ContrastiveCrop's "
                                      "datasets; pass --recipe")
            return LINEAR_RECIPES[classes]
        method = released.layout
        if released.arch == "resnet50":
            version = "2" if self._mlp_head(released, "encoder_q.") else "1"
            return f"imagenet/mocov{version}_ccrop_r50_100ep"
        return f"cifar10/{'mocov2' if method == 'moco' else method}_ccrop_r18_500ep"

    def overrides(self, released: Released) -> list[str]:
        extra = [f"model.arch={released.arch}", f"model.cifar_stem={str(released.info['cifar_stem']).lower()}"]
        if released.layout in ("moco", "simclr"):
            prefix = "encoder_q." if released.layout == "moco" else ""
            extra += ["method.proj_hidden_bn=false"] if self._mlp_head(released, prefix) else ["method.proj_layers=1"]
        return extra

    def place(self, released: Released, placement: Placement) -> None:
        if released.kind == LINEAR:
            placement.take("fc.weight", "classifier")
            placement.take("fc.bias", "classifier")
            placement.put_prefix("", "backbone.")
            for head in ("projector", "predictor", "queue", "key_encoder.1", "target_encoder.1"):
                placement.keep_initial(f"{head}.*", LINEAR_ONLY)
            for momentum in ("key_encoder.0.", "target_encoder.0."):
                placement.copy_ours("backbone.", momentum, LINEAR_ONLY + " (a copy of the backbone)")
            return
        getattr(self, f"_place_{released.layout}")(placement)

    def _place_moco(self, placement: Placement) -> None:
        place_moco(placement)

    def _place_simclr(self, placement: Placement) -> None:
        place_fc(placement, "fc", "projector")
        placement.put_prefix("", "backbone.")

    def _place_byol(self, placement: Placement) -> None:
        for src, dst in (("encoder_q.fc", "projector"), ("encoder_k.fc", "target_encoder.1"),
                         ("predictor", "predictor")):
            placement.fold_bias(f"{src}.0", f"{src}.1", f"{dst}.0", f"{dst}.1")
            placement.put_prefix(f"{src}.3.", f"{dst}.3.")
        placement.put_prefix("encoder_q.", "backbone.")
        placement.put_prefix("encoder_k.", "target_encoder.0.")

    def _place_simsiam(self, placement: Placement) -> None:
        placement.fold_bias("encoder.fc.6", "encoder.fc.7", "projector.6", "projector.7")
        placement.put_prefix("encoder.fc.", "projector.")
        placement.put_prefix("encoder.", "backbone.")
        placement.put_prefix("predictor.", "predictor.")

    def classifier(self, released: Released) -> dict[str, torch.Tensor] | None:
        return probe_classifier(released)

    def extras(self, released: Released, cfg: Any) -> dict[str, Any]:
        if released.kind != PRETRAIN or "boxes" not in released.raw:
            return {}
        warmup = cfg.views.params.get("box_warmup_epochs")
        if warmup is None:  # only planners with a localised box store have a warm-up
            released.other["boxes"] = f"not used: the recipe's planner {cfg.views.planner!r} keeps no boxes"
            return {}
        boxes = torch.as_tensor(released.raw["boxes"]).float()
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise CheckpointError(f"{released.path}: 'boxes' has shape {list(boxes.shape)}, expected [N, 4]")
        enabled = released.epoch is not None and released.epoch >= warmup
        # the box table is the localiser observer's checkpointed state (contrastlab.observers.localisation)
        return {"observers": {"localiser": {"boxes": boxes[:, [1, 0, 3, 2]].contiguous(), "enabled": enabled}}}
