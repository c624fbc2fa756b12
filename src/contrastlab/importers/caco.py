"""CaCo (Wang, Qi, TPAMI 2023; maple-research-lab/CaCo): pre-training and linear-probe files.

Released layouts:

- pre-training (``training/main_worker.py``: ``checkpoint_best.pth.tar``, which is the latest epoch, and
  ``checkpoint_NNNN.pth.tar``): ``epoch`` (epochs completed), ``arch``, ``best_acc``, ``knn_acc``, ``state_dict``
  (the DDP model: ``module.encoder_q.*`` and ``module.encoder_k.*``, torchvision-named ResNets whose ``fc`` is the
  3-layer projector Linear-BN-ReLU-Linear-BN-ReLU-Linear, bias-free), ``optimizer`` and ``Memory_Bank``
  (``W`` and ``v``, both ``[dim, K]``). Placed as ``backbone`` / ``projector`` (``encoder_q``),
  ``key_encoder.0`` / ``key_encoder.1`` (``encoder_k``) and ``memory.weight`` / ``memory.velocity`` of
  :class:`~contrastlab.methods.CaCo` (same orientation); ``memory_written`` is set to the memory size, since the
  released memory is trained (no warm start is due when training resumes).
- linear probe (``linear.py``): ``state_dict`` with ``module.<ResNet>`` and the classifier ``module.fc``; the
  classifier goes to the checkpoint's ``classifier`` entry, the heads keep their fresh initialisation, the key
  encoder starts as a copy, and the memory is a fresh random one still to be filled by the warm start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from contrastlab.errors import CheckpointError
from contrastlab.importers.base import (
    LINEAR,
    PRETRAIN,
    Importer,
    Released,
    plain,
    probe_classifier,
    state_under,
    upstream_epoch,
)
from contrastlab.importers.mocov3 import LINEAR_ONLY, NOT_CARRIED, recipe_for_epochs
from contrastlab.importers.placement import Placement
from contrastlab.registry import register_importer

RECIPES = {200: "imagenet/caco_r50_200ep_bs1024", 800: "imagenet/caco_multicrop_r50_800ep_bs2048"}


@register_importer()
class CaCoImporter(Importer):
    """maple-research-lab/CaCo ``.pth.tar`` files (see the module docstring)."""

    name = "caco"
    project = "maple-research-lab/CaCo"

    def recognise(self, raw: dict[str, Any], path: Path) -> Released:
        state = state_under(raw, "state_dict", path)
        arch = raw.get("arch") if isinstance(raw.get("arch"), str) else "resnet50"
        info = {k: plain(raw[k]) for k in ("best_acc", "knn_acc", "best_acc1") if k in raw}
        other = {k: NOT_CARRIED.get(k, "kept in the imported record") for k in raw
                 if k not in ("state_dict", "Memory_Bank")}
        if any(k.startswith("encoder_q.") for k in state):
            bank = raw.get("Memory_Bank")
            if not isinstance(bank, dict) or not {"W", "v"} <= set(bank):
                raise CheckpointError(f"{path}: a CaCo training file holds its memory under 'Memory_Bank' (W, v); "
                                      f"top-level keys found: {sorted(raw)}")
            state = {**state, **{f"Memory_Bank.{k}": v for k, v in bank.items()}}
            return Released(path, raw, state, PRETRAIN, "resnet", upstream_epoch(raw), arch, info, other)
        if "fc.weight" in state:
            return Released(path, raw, state, LINEAR, "resnet", upstream_epoch(raw), arch, info, other)
        raise CheckpointError(f"{path}: neither a CaCo training file (module.encoder_q.*, module.encoder_k.*, "
                              f"Memory_Bank) nor a linear-probe file (ResNet + fc); first keys: {list(state)[:5]}")

    def default_recipe(self, released: Released) -> str:
        return recipe_for_epochs(RECIPES, released.epoch if released.kind == PRETRAIN else None)

    def place(self, released: Released, placement: Placement) -> None:
        if released.kind == PRETRAIN:
            placement.put_prefix("encoder_q.fc.", "projector.")
            placement.put_prefix("encoder_q.", "backbone.")
            placement.put_prefix("encoder_k.fc.", "key_encoder.1.")
            placement.put_prefix("encoder_k.", "key_encoder.0.")
            placement.put("Memory_Bank.W", "memory.weight")
            placement.put("Memory_Bank.v", "memory.velocity")
            size = placement.target["memory.weight"].shape[1]
            placement.fill("memory_written", torch.tensor(size), "the released memory is trained: all its columns "
                           "count as written, so no warm start runs when training resumes")
            return
        placement.take("fc.weight", "classifier")
        placement.take("fc.bias", "classifier")
        placement.put_prefix("", "backbone.")
        placement.keep_initial("projector.*", LINEAR_ONLY)
        placement.keep_initial("memory.*", LINEAR_ONLY + " (a random memory)")
        placement.keep_initial("memory_written", LINEAR_ONLY + " (the warm start fills the memory)")
        placement.copy_ours("backbone.", "key_encoder.0.", LINEAR_ONLY + " (a copy of the backbone)")
        placement.copy_ours("projector.", "key_encoder.1.", LINEAR_ONLY + " (a copy of the projector)")

    def classifier(self, released: Released) -> dict[str, torch.Tensor] | None:
        return probe_classifier(released)
