"""Backbone weight export for downstream code: torchvision, timm and detectron2 formats.

- ``torchvision``: the ``state_dict`` of a torchvision ResNet (``resnet18/34/50``, ImageNet stem) without
  its ``fc``: ``m = torchvision.models.resnet50(); m.fc = nn.Identity(); m.load_state_dict(torch.load(f))``
  matches every key strictly.
- ``timm``: the ``state_dict`` of MoCo v3's ``vit_small`` / ``vit_base``, which loads strictly into
  ``timm.create_model("vit_small_patch16_224" / "vit_base_patch16_224", num_classes=0)`` (set ``num_heads=12``
  for ViT-S to get MoCo v3's function: the head count changes no weight shape).
- ``detectron2``: a pickled ``{"model": {name: numpy array}, "__author__": "contrastlab",
  "matching_heuristics": True}`` with detectron2's ResNet names (``stem.conv1``, ``res2`` .. ``res5``,
  ``convN.norm``, ``shortcut``), the layout detectron2's own torchvision-to-detectron2 conversion produces;
  BatchNorm's ``num_batches_tracked`` counters are dropped (detectron2's frozen BN has none). Use it with
  ``MODEL.WEIGHTS`` and ``MODEL.PIXEL_MEAN/STD`` of torchvision models (RGB, ``INPUT.FORMAT RGB``), as MoCo's
  detection transfer does.

Every file is written atomically.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from contrastlab.engine.checkpoint import write_atomically
from contrastlab.errors import ConfigError
from contrastlab.models.vit import TIMM_EQUIVALENT

__all__ = ["FORMATS", "detectron2_name", "export_backbone"]

FORMATS = ("torchvision", "timm", "detectron2")
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50")


def detectron2_name(name: str) -> str:
    """detectron2's name of a torchvision ResNet parameter (``layer1.0.bn1.weight`` -> ``res2.0.conv1.norm.weight``)."""
    if not name.startswith("layer"):
        name = "stem." + name
    name = re.sub(r"layer([1-4])", lambda m: f"res{int(m.group(1)) + 1}", name)
    name = re.sub(r"bn([1-3])", r"conv\1.norm", name)
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def _check(fmt: str, arch: str, cifar_stem: bool) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt in ("torchvision", "detectron2"):
        if arch not in TORCHVISION_RESNETS:
            raise ConfigError(f"--format {fmt} exports torchvision ResNets ({', '.join(TORCHVISION_RESNETS)}); this "
                              f"checkpoint's backbone is {arch!r}" + (" (use --format timm)" if arch in TIMM_EQUIVALENT else ""))
        if cifar_stem:
            raise ConfigError(f"this {arch} has a CIFAR stem (3x3 conv1, no max-pool): its conv1 does not fit torchvision's "
                              f"or detectron2's {arch}, so --format {fmt} cannot load strictly there")
    elif arch not in TIMM_EQUIVALENT:
        raise ConfigError(f"--format timm exports MoCo v3's {', '.join(TIMM_EQUIVALENT)} (timm "
                          f"{', '.join(TIMM_EQUIVALENT.values())}); this checkpoint's backbone is {arch!r}, which timm "
                          "has no model for" + (" (use --format torchvision)" if arch in TORCHVISION_RESNETS else ""))


def export_backbone(state: dict[str, torch.Tensor], arch: str, fmt: str, out: str | Path,
                    cifar_stem: bool = False) -> dict[str, Any]:
    """Write ``state`` (a backbone ``state_dict``) to ``out`` in format ``fmt``; returns a summary.

    Raises:
        ConfigError: a format the architecture cannot be loaded into (named, with the alternative).
    """
    _check(fmt, arch, cifar_stem)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if fmt == "detectron2":
        model = {detectron2_name(k): v.numpy() for k, v in tensors.items() if not k.endswith("num_batches_tracked")}
        payload = pickle.dumps({"model": model, "__author__": "contrastlab", "matching_heuristics": True})
        count = len(model)
    else:
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        payload = buffer.getvalue()
        count = len(tensors)
    write_atomically(payload, out)
    target = {"torchvision": f"torchvision.models.{arch} (fc = nn.Identity())",
              "timm": f"timm {TIMM_EQUIVALENT.get(arch, '')} (num_classes=0)",
              "detectron2": f"detectron2 ResNet-{arch.removeprefix('resnet')} (MODEL.WEIGHTS)"}[fmt]
    return {"out": str(out), "format": fmt, "arch": arch, "tensors": count, "bytes": len(payload), "loads_into": target}
