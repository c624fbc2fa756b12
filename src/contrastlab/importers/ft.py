"""Feature Transformation (Zhu et al., ICCV 2021; DTennant/CL-Visualizing-Feature-Transformation).

FT's released models (its README's table) come in two layouts:

- the "+FT" models, written by its PyContrast trainer (``learning/contrast_trainer.py``): ``model`` (the DDP
  model, ``module.encoder.*`` a torchvision-named ResNet-50 and ``module.head.*`` the projection head: ``head.0``
  one Linear for MoCo v1, ``head.0`` / ``head.2`` Linear-ReLU-Linear for MoCo v2, then a parameter-free L2
  normalisation), ``model_ema`` (the momentum encoder, same names, not DDP-wrapped), ``contrast`` (``memory``, the
  queue ``[K, dim]``), ``optimizer``, ``epoch`` (epochs completed) and, with apex, ``amp``. Placed in
  :class:`~contrastlab.methods.MoCo` (``method.proj_layers=1`` or ``method.proj_hidden_bn=false``); the queue
  keeps its orientation. The write position of the queue is a Python attribute upstream that is not saved (its
  own resume restarts at row 0); the importer sets ``queue.ptr`` to 0 likewise.
- the MoCo v1 / v2 baselines it links, facebookresearch/moco's ``moco_v{1,2}_200ep_pretrain.pth.tar``: ``epoch``,
  ``arch``, ``state_dict`` (``module.encoder_q.*``, ``module.encoder_k.*``, ``module.queue`` ``[dim, K]``,
  ``module.queue_ptr``) and ``optimizer``: the layout ContrastiveCrop's MoCo adapts
  (:func:`contrastlab.importers.ccrop.place_moco`); and facebookresearch/moco's linear-probe files
  (``state_dict`` with the ResNet and ``fc``), whose classifier goes to the checkpoint's ``classifier`` entry.

FT's own linear-probe files (``learning/linear_trainer.py``: ``classifier``, ``epoch``, ``optimizer``) hold only the
classifier, not the backbone: import the pre-training file they were trained on with ``--classifier FILE``
(:meth:`FeatureTransformImporter.classifier_file`); the classifier becomes the checkpoint's stored classifier.
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
from contrastlab.importers.ccrop import place_fc, place_moco
from contrastlab.importers.mocov3 import LINEAR_ONLY
from contrastlab.importers.placement import Placement
from contrastlab.registry import register_importer

NOT_CARRIED = {"optimizer": OPTIMIZER_NOT_CARRIED,
               "amp": "not carried over (apex mixed-precision state)"}


@register_importer()
class FeatureTransformImporter(Importer):
    """FT's PyContrast files and the facebookresearch/moco files it builds on (see the module docstring)."""

    name = "ft"
    project = "DTennant/CL-Visualizing-Feature-Transformation"

    def recognise(self, raw: dict[str, Any], path: Path) -> Released:
        other = {k: NOT_CARRIED.get(k, "kept in the imported record") for k in raw
                 if k not in ("model", "model_ema", "contrast", "state_dict")}
        info = {k: plain(raw[k]) for k in ("best_acc1",) if k in raw}
        if "model" in raw and "contrast" in raw:
            if not isinstance(raw.get("model_ema"), dict):
                raise CheckpointError(f"{path}: a PyContrast file without 'model_ema' was not trained with a MoCo "
                                      "memory (FT's setting); only MoCo-style files import")
            state = {**{f"model.{k}": v for k, v in state_under(raw, "model", path).items()},
                     **{f"model_ema.{k}": v for k, v in state_under(raw, "model_ema", path).items()},
                     **{f"contrast.{k}": v for k, v in state_under(raw, "contrast", path).items()}}
            return Released(path, raw, state, PRETRAIN, "pycontrast", upstream_epoch(raw), "resnet50", info, other)
        if "classifier" in raw and "model" not in raw and "state_dict" not in raw:
            raise CheckpointError(f"{path}: an FT linear-probe file holds only the classifier, not the backbone; import "
                                  f"the pre-training file it was trained on with --classifier {path}")
        state = state_under(raw, "state_dict", path)
        arch = raw.get("arch") if isinstance(raw.get("arch"), str) else "resnet50"
        if any(k.startswith("encoder_q.") for k in state):
            return Released(path, raw, state, PRETRAIN, "moco", upstream_epoch(raw), arch, info, other)
        if "fc.weight" in state:
            return Released(path, raw, state, LINEAR, "moco", upstream_epoch(raw), arch, info, other)
        raise CheckpointError(f"{path}: neither FT's PyContrast layout (model, model_ema, contrast) nor "
                              f"facebookresearch/moco's (state_dict with encoder_q / fc); top-level keys: {sorted(raw)}")

    def classifier_file(self, raw: dict[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``learning/linear_trainer.py``'s file: ``classifier`` (the DDP-wrapped ``nn.Linear``: ``module.weight``,
        ``module.bias``), ``epoch`` (the last epoch, counted from 1) and ``optimizer`` (not carried over)."""
        state = state_under(raw, "classifier", path)
        if set(state) != {"weight", "bias"}:
            raise CheckpointError(f"{path}: 'classifier' should hold one Linear layer (weight, bias); found {sorted(state)}")
        return {"weight": state["weight"], "bias": state["bias"]}, {"epoch": plain(raw.get("epoch")),
                                                                     "optimizer": "not carried over"}

    def classifier(self, released: Released) -> dict[str, torch.Tensor] | None:
        return probe_classifier(released)

    def _v2(self, released: Released) -> bool:
        keys = ("model.head.2.weight", "encoder_q.fc.2.weight")
        return any(k in released.state for k in keys)

    def default_recipe(self, released: Released) -> str:
        if released.kind == LINEAR:
            return "imagenet/mocov2_r50_200ep"
        ft = "_ft" if released.layout == "pycontrast" else ""
        return f"imagenet/mocov{'2' if self._v2(released) else '1'}{ft}_r50_200ep"

    def overrides(self, released: Released) -> list[str]:
        if released.kind == LINEAR:
            return super().overrides(released)
        head = "method.proj_hidden_bn=false" if self._v2(released) else "method.proj_layers=1"
        return [*super().overrides(released), head]

    def place(self, released: Released, placement: Placement) -> None:
        if released.kind == LINEAR:
            placement.take("fc.weight", "classifier")
            placement.take("fc.bias", "classifier")
            placement.put_prefix("", "backbone.")
            placement.keep_initial("projector.*", LINEAR_ONLY)
            placement.keep_initial("key_encoder.1.*", LINEAR_ONLY)
            placement.keep_initial("queue.*", LINEAR_ONLY)
            placement.copy_ours("backbone.", "key_encoder.0.", LINEAR_ONLY + " (a copy of the backbone)")
            return
        if released.layout == "moco":
            place_moco(placement)
            return
        for src, online, projector in (("model", "backbone.", "projector"),
                                       ("model_ema", "key_encoder.0.", "key_encoder.1")):
            place_fc(placement, f"{src}.head", projector)
            placement.put_prefix(f"{src}.encoder.", online)
        placement.put("contrast.memory", "queue.queue")
        placement.fill("queue.ptr", torch.tensor(0), "not saved upstream (a Python attribute); its own resume also "
                       "restarts writing the queue at row 0")
