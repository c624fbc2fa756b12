"""Run a function on two (or more) gloo ranks of one machine and collect what each rank returns.

The distributed tests compare a method under DDP with one process on the same global batch: each spawns its ranks
with this helper, so the process-group set-up is written once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_on_ranks(work: Callable[[int, Path], dict], folder: Path, world: int = 2) -> list[dict]:
    """``work(rank, folder)`` on ``world`` spawned gloo ranks (one torch thread each, ``RANK``/``WORLD_SIZE``/
    ``LOCAL_RANK`` set as torchrun sets them); the dicts they return, in rank order. ``work`` must be a module-level
    function (spawned processes import it)."""
    mp.spawn(_rank, args=(work, str(folder), world), nprocs=world, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _rank(rank: int, work: Callable[[int, Path], dict], folder: str, world: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    try:
        torch.save(work(rank, Path(folder)), Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
