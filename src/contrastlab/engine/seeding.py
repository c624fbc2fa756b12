"""Seeds and random states of a run: global generators seeded per ``(seed, rank, epoch)``, saved and restored.

An epoch's random draws outside the views (dropout, Feature Transformation's default stream, CaCo's noise) come
from the global generators, re-seeded at every epoch start from :func:`epoch_seed`; a checkpoint written mid-epoch
keeps their states (:func:`rng_state`) so a resumed run continues the same sequence.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """A distinct, reproducible seed for each (run seed, rank, epoch)."""
    return (seed * 1_000_003 + rank * 10_007 + epoch * 101 + 17) % 2**63


def rng_state() -> dict[str, Any]:
    """This process's global RNG states (torch, CUDA, NumPy, Python), as tensors and plain containers only (a
    checkpoint holds nothing else: :mod:`contrastlab.safe_load`)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (numpy's key as a tensor, or as the array older checkpoints held)."""
    torch.set_rng_state(state["torch"].cpu())
    kind, key, *rest = state["numpy"]
    key = key.cpu().numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    np.random.set_state((kind, key.astype(np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
