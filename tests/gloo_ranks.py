"""Run a function on two (or more) gloo ranks of one machine and collect what each rank returns.

The distributed tests compare a method under DDP with one process on the same global batch: each starts its ranks
with this helper, so the process-group set-up is written once.

The ranks are forked from a server process that has imported torch and contrastlab once (Python's ``forkserver``
start method, with those modules preloaded), not started afresh as ``spawn`` does: a fresh interpreter spends about
4 s of CPU importing them, for each rank of each test module. The server starts clean (it is not a fork of the test
process, whose threads and state a fork would copy), and each rank still imports the test module that holds its
function.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PRELOAD = ["torch", "torch.distributed", "torchvision", "contrastlab.engine.trainer", "gloo_ranks"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now: the rendezvous or store port of ranks started as
    separate processes (torchrun agents, SLURM tasks, ``init_distributed``'s ``env://``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(fn: Callable[..., None], args: tuple[Any, ...], world: int) -> None:
    """``fn(rank, *args)`` in ``world`` processes forked from the preloaded server; returns when all have ended
    (raises, with the rank's traceback, if one failed). ``fn`` must be a module-level function."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # read when the server starts: the first call in this process
    mp.start_processes(fn, args=args, nprocs=world, join=True, start_method="forkserver")


def run_on_ranks(work: Callable[[int, Path], dict], folder: Path, world: int = 2) -> list[dict]:
    """``work(rank, folder)`` on ``world`` gloo ranks (one torch thread each, ``RANK``/``WORLD_SIZE``/
    ``LOCAL_RANK`` set as torchrun sets them); the dicts they return, in rank order. ``work`` must be a module-level
    function."""
    start_ranks(_rank, (work, str(folder), world), world)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _rank(rank: int, work: Callable[[int, Path], dict], folder: str, world: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    try:
        torch.save(work(rank, Path(folder)), Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
