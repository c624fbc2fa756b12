"""What every importer shares: reading a released file, and the interface an importer implements.

An importer (one module per upstream project, registered in :data:`contrastlab.importers.IMPORTERS`) turns
one released file into a :class:`Released` (which weights it holds, which layout, the upstream epoch),
picks the recipe whose model matches it, and places its tensors into our method
(:class:`~contrastlab.importers.placement.Placement`). :func:`contrastlab.importers.import_checkpoint` drives
the conversion and writes the contrastlab checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from contrastlab.errors import CheckpointError
from contrastlab.importers.placement import Placement
from contrastlab.safe_load import load_torch_file

PRETRAIN, LINEAR, SUPERVISED, BACKBONE = "pretrain", "linear", "supervised", "backbone"
OPTIMIZER_NOT_CARRIED = "not carried over: a resumed run starts with fresh optimizer state"
"""Kinds of released file: a pre-training checkpoint, a linear-probe checkpoint (backbone + classifier; also a
fine-tuned network with its head), a supervised model (MCL's peers with their classifiers), a backbone alone (MoCo
v3's ``convert_to_deit.py`` output)."""


@dataclass
class Released:
    """One released file, read and recognised.

    Attributes:
        path: the file.
        raw: the whole dictionary ``torch.load`` returned.
        state: the weights, a ``module.`` prefix (DDP) removed.
        kind: :data:`PRETRAIN`, :data:`LINEAR` or :data:`SUPERVISED`.
        layout: the importer's name for the layout recognised (e.g. ``resnet``, ``vit``, ``moco_state``).
        epoch: epochs of training the file records (upstream's count), or None.
        arch: the architecture the file names or implies, or None.
        info: metadata kept in the checkpoint's ``imported`` record (best accuracy, kNN accuracy, ...).
        other: top-level entries besides the weights: name -> what happens to them (for the log).
    """

    path: Path
    raw: dict[str, Any]
    state: dict[str, torch.Tensor]
    kind: str
    layout: str
    epoch: int | None = None
    arch: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    other: dict[str, str] = field(default_factory=dict)


def read_released(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, Any]:
    """``torch.load`` a released file on the CPU, as tensors and plain containers only unless ``allow_pickle``.

    Raises:
        CheckpointError: missing, unreadable, not a dictionary, or (without ``allow_pickle``) holding Python objects
            that a weights-only load refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; pass the released checkpoint file (.pth.tar / .pth)")
    raw = load_torch_file(path, "cpu", trust_pickle=allow_pickle, what="released file")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not the dictionary a released checkpoint is")
    return raw


def strip_module(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``state`` without the ``module.`` prefix DistributedDataParallel / DataParallel add (when every key has it)."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(state):
        odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)][:3]
        raise CheckpointError(f"the state dict holds entries that are not tensors: {odd}")
    if tensors and all(k.startswith("module.") for k in tensors):
        return {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def state_under(raw: dict[str, Any], key: str, path: Path) -> dict[str, torch.Tensor]:
    """The state dict stored under ``raw[key]``, ``module.`` removed; CheckpointError naming the keys found."""
    if not isinstance(raw.get(key), dict):
        raise CheckpointError(f"{path}: expected the weights under {key!r}; top-level keys found: {sorted(raw)}")
    return strip_module(raw[key])


class Importer:
    """Base of the per-project importers.

    Subclasses set :attr:`name` (the ``--from`` value), :attr:`project` (the upstream repository) and implement
    :meth:`recognise`, :meth:`default_recipe` and :meth:`place`.
    """

    name: ClassVar[str] = ""
    project: ClassVar[str] = ""

    def recognise(self, raw: dict[str, Any], path: Path) -> Released:
        """Classify the file; CheckpointError naming what was found when it is not a layout of this project."""
        raise NotImplementedError

    def default_recipe(self, released: Released) -> str:
        """The recipe whose model matches the file (``--recipe`` chooses another)."""
        raise NotImplementedError

    def overrides(self, released: Released) -> list[str]:
        """Config overrides the file implies (e.g. ``model.arch``), applied before the user's own."""
        return [f"model.arch={released.arch}"] if released.arch else []

    def num_classes(self, released: Released) -> int:
        """Classes of the method's classifiers, for methods that have them (MCL); 1 otherwise."""
        return 1

    def place(self, released: Released, placement: Placement) -> None:
        """Put every tensor of ``released.state`` into ``placement`` (see :class:`Placement`)."""
        raise NotImplementedError

    def classifier(self, released: Released) -> dict[str, torch.Tensor] | None:
        """A linear-probe file's classifier ``{"weight": [C, D], "bias": [C]}``, else None."""
        return None

    def classifier_file(self, raw: dict[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The classifier ``{"weight": [C, D], "bias": [C]}`` of a linear-probe file that holds nothing else, and
        the metadata to keep (``--classifier FILE``); CheckpointError where the project's probe files hold their
        backbone (import the probe file itself)."""
        raise CheckpointError(f"{path}: --classifier takes a linear-probe file holding only a classifier (FT's "
                              f"main_linear.py); {self.project}'s probe files hold their backbone: import the probe "
                              "file itself")

    def extras(self, released: Released, cfg: Any) -> dict[str, Any]:
        """Other entries of our checkpoint the file provides (e.g. ContrastiveCrop's boxes)."""
        return {}


def probe_classifier(released: Released, head: str = "fc") -> dict[str, torch.Tensor] | None:
    """A linear-probe file's classifier, its ``<head>.weight`` and ``<head>.bias`` (what :meth:`Importer.place`
    takes to "classifier"); None for the other kinds of file."""
    if released.kind != LINEAR:
        return None
    return {"weight": released.state[f"{head}.weight"], "bias": released.state[f"{head}.bias"]}


def upstream_epoch(raw: dict[str, Any], completed_offset: int = 0) -> int | None:
    """``raw["epoch"]`` as epochs completed (``completed_offset`` 1 where upstream stores the last epoch's index)."""
    value = raw.get("epoch")
    if isinstance(value, torch.Tensor):
        value = int(value)
    return int(value) + completed_offset if isinstance(value, int) else None


def plain(value: Any) -> Any:
    """A JSON-friendly copy of a metadata value (tensors become numbers)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def eval_linear_classifier(raw: dict[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The classifier of an ``eval_linear.py`` file of facebookresearch/swav or facebookresearch/dino (``--classifier
    FILE``): ``state_dict`` (one ``Linear`` under ``linear.``, DDP's ``module.`` removed), ``epoch``, ``best_acc`` (the
    best validation top-1 over the epochs), ``optimizer`` and ``scheduler`` (not carried)."""
    state = state_under(raw, "state_dict", path)
    if set(state) != {"linear.weight", "linear.bias"}:
        raise CheckpointError(f"{path}: eval_linear.py's 'state_dict' holds one Linear (linear.weight, "
                              f"linear.bias); found {sorted(state)}")
    return ({"weight": state["linear.weight"], "bias": state["linear.bias"]},
            {"epoch": plain(raw.get("epoch")), "best_acc": plain(raw.get("best_acc")),
             "optimizer": "not carried over", "scheduler": "not carried over"})
