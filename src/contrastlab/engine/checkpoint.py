"""Checkpoints: atomic writes, clear errors on damaged files, and the backbone loader used by eval.

A checkpoint is a ``torch.save`` dictionary with ``format == "contrastlab-checkpoint"``. It is written
to a temporary file in the same folder, flushed, fsynced, then renamed over the target, so a crash
never leaves a half-written ``last.pt``.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from contrastlab.errors import CheckpointError

FORMAT = "contrastlab-checkpoint"
VERSION = 1


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (temp file, fsync, rename, fsync folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buffer.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a contrastlab checkpoint; CheckpointError naming the file when it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a .pt file written by "
                              "`contrastlab train` (runs/<name>/checkpoints/last.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises many types for truncated / corrupt zip files
        raise CheckpointError(f"checkpoint {path} is damaged or not a torch file ({type(exc).__name__}: {exc}); "
                              "use an earlier checkpoint from the same folder") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} was not written by contrastlab (no '{FORMAT}' marker); "
                              "to evaluate foreign weights, convert them first")
    return ckpt


def backbone_state(ckpt: dict[str, Any], peer: int | None = None) -> dict[str, torch.Tensor]:
    """The online backbone's weights from a checkpoint's method state (keys without ``backbone.``).

    ``peer`` selects peer ``i`` of a cohort method (MCL) instead: its weights, shared trunk included, are
    under ``cohort.peers.<i>.``; ``backbone.`` is peer 0.
    """
    prefix = "backbone." if peer is None else f"cohort.peers.{peer}."
    state = {k[len(prefix):]: v for k, v in ckpt["method"].items() if k.startswith(prefix)}
    if not state:
        if peer is not None:
            peers = sorted({int(k.split(".")[2]) for k in ckpt["method"] if k.startswith("cohort.peers.")})
            raise CheckpointError(f"checkpoint has no peer {peer}; its peers: {peers or 'none (not a cohort method)'}")
        raise CheckpointError("checkpoint holds no 'backbone.*' weights in its method state")
    return state


def load_backbone_weights(backbone: nn.Module, ckpt: dict[str, Any], source: str = "checkpoint",
                          peer: int | None = None) -> None:
    """Load the backbone (or cohort peer ``peer``) weights strictly; CheckpointError listing mismatches."""
    try:
        backbone.load_state_dict(backbone_state(ckpt, peer), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: backbone weights do not match the model built from its config: {exc}") from exc
