"""Distributed helpers: process group set-up under torchrun, rank queries and gathers.

Gathers that must carry gradients (SimCLR's negatives, MoCo v3's keys) use
:func:`gather_with_grad`, an autograd function of our own: the backward pass sums the gradient of the
gathered tensor over all ranks and returns each rank the slice of its own input (the semantics of the
now-deprecated ``torch.distributed.nn.functional.all_gather``); sums over ranks that must carry gradients (Barlow
Twins' cross-correlation) use :func:`all_reduce_with_grad`, whose backward sums the gradient alike. Gathers that feed
buffers (queues, memory banks) use :func:`gather_no_grad`. All return the input unchanged when no process group is
initialised, so every building block works in a single process.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


def is_initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 when not distributed."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Number of ranks, 1 when not distributed."""
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process)."""
    return get_rank() == 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping the gradient path to every slice.

    Args:
        x: a tensor of the same shape on every rank.

    Returns:
        ``[world_size * B, ...]``; in a single process, ``x`` itself.
    """
    if get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward all-reduces the gradient and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.batch = x.shape[0]
        out = [torch.empty_like(x) for _ in range(get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = get_rank() * ctx.batch
        return grad[start:start + ctx.batch]


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over every rank, with a backward pass that sums the gradient over every rank too.

    The convention of :func:`gather_with_grad`: every rank's loss depends on every rank's ``x`` through the sum,
    so each rank receives the gradient of the sum of all ranks' losses; DDP's averaging of parameter gradients then
    gives exactly the single-process gradient (Barlow Twins' cross-correlation and its batch statistics).

    Args:
        x: a tensor of the same shape on every rank.

    Returns:
        the sum, same shape; in a single process, ``x`` itself.
    """
    if get_world_size() == 1:
        return x
    return _AllReduceWithGrad.apply(x)


class _AllReduceWithGrad(torch.autograd.Function):
    """all_reduce (sum) whose backward all-reduces (sums) the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.detach().clone().contiguous()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, without gradient (for buffers)."""
    if get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (in place on a copy); ``x`` in a single process."""
    if get_world_size() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / get_world_size()


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` is true on at least one rank (every rank gets the same answer)."""
    if get_world_size() == 1:
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: object) -> list[object]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in a single process)."""
    if get_world_size() == 1:
        return [obj]
    out: list[object] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Broadcast ``x`` from ``src`` to every rank in place."""
    if get_world_size() > 1:
        dist.broadcast(x, src)
    return x


@dataclass(frozen=True)
class DistEnv:
    """What torchrun (or SLURM) told this process."""

    rank: int
    local_rank: int
    world_size: int

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def read_env() -> DistEnv:
    """Rank, local rank and world size from torchrun's variables, else from SLURM's, else single."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]))
    return DistEnv(0, 0, 1)


def restarted_by_torchrun(device: torch.device | str = "cpu") -> bool:
    """Whether this process belongs to a torchrun job that was restarted (on any node: every rank gets the answer).

    ``TORCHELASTIC_RESTART_COUNT`` is counted per node's agent: an agent whose own worker failed counts a restart,
    the agent of a healthy node that restarts its workers to re-form the group does not. So the ranks agree on it.
    """
    return any_rank(int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0, device)


def _fresh_store(rank: int, world_size: int, timeout: timedelta = timedelta(minutes=30)) -> dist.Store:
    """A key-value store for this attempt's process group, new at every torchrun restart.

    torchrun's agents share one TCP store across restarts (``TORCHELASTIC_USE_AGENT_STORE``): the keys a failed
    attempt's process group wrote there are still present when the restarted ranks form theirs, and a rank reading
    a dead peer's address hangs or fails (seen with gloo, single- and multi-node). Rank 0 therefore hosts a fresh
    ``TCPStore`` and publishes its port and a random nonce in the agent's store; the other ranks connect to it and
    check the nonce, and retry while what they read is a previous attempt's entry (its server is gone, or it
    answers with another nonce). Restart counts cannot name the attempt: they differ between nodes.
    """
    agent, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size))
    host, key = os.environ["MASTER_ADDR"], "contrastlab/process_group_store"
    if rank == 0:
        store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        nonce = uuid.uuid4().hex
        store.set("contrastlab/nonce", nonce)
        agent.set(key, f"{store.port} {nonce}")
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        port, nonce = agent.get(key).decode().split()
        try:
            store = dist.TCPStore(host, int(port), world_size, is_master=False, timeout=timedelta(seconds=1))
            if store.get("contrastlab/nonce").decode() == nonce:
                store.set_timeout(timeout)
                return store
        except (RuntimeError, OSError):  # a previous attempt's store: its server is gone
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {rank}: no process-group store of this attempt appeared in {timeout}")
        time.sleep(0.2)


def init_distributed(device_type: str) -> DistEnv:
    """Initialise the default process group when launched with several ranks.

    NCCL on CUDA, gloo otherwise. Under SLURM without torchrun, ``MASTER_ADDR`` and
    ``MASTER_PORT`` must be exported by the job script. Under torchrun (on one node or several) the group's store
    is a fresh one of every attempt (:func:`_fresh_store`), so a job restarted by ``--max-restarts`` forms its
    group cleanly. The group is destroyed when the process ends cleanly (:func:`_destroy_at_clean_exit`).
    """
    denv = read_env()
    if denv.distributed and not is_initialized():
        atexit.register(_destroy_at_clean_exit)
        os.environ.setdefault("RANK", str(denv.rank))
        os.environ.setdefault("WORLD_SIZE", str(denv.world_size))
        os.environ.setdefault("LOCAL_RANK", str(denv.local_rank))
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(denv.local_rank)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store = _fresh_store(denv.rank, denv.world_size)
            dist.init_process_group(backend=backend, store=store, rank=denv.rank, world_size=denv.world_size)
        else:
            dist.init_process_group(backend=backend)
    return denv


_group_left_at_exit = False  # set by leave_group_at_exit()


def leave_group_at_exit() -> None:
    """Keep :func:`init_distributed`'s exit handler from tearing the process group down (the process stops on an
    interrupt: a peer may be inside a collective this rank will not join)."""
    global _group_left_at_exit
    _group_left_at_exit = True


def _destroy_at_clean_exit() -> None:
    """Destroy the process group :func:`init_distributed` formed, while the interpreter is still whole.

    Left to interpreter shutdown, a gloo rank at times aborts as it ends ("terminate called without an active
    exception", SIGABRT; pytorch/pytorch#190489): in ``benchmarks/gloo_exit.py``, 4 of 48 ranks that ended right
    after their collectives did, none of 48 whose group this handler destroyed. Not after an unhandled exception
    or an interrupt (:func:`leave_group_at_exit`): with a peer stopped inside a collective, tearing the group down
    could wait on it, which is why torchtitan destroys its group only on a clean exit (pytorch/torchtitan#1342).

    The group lives on while anything holds it: a trainer's DDP model, in a reference cycle until a garbage
    collection, kept its gloo threads running past ``destroy_process_group`` (4-5 threads at exit in a two-rank
    training run, 1 with the collection below). torch._dynamo imported for the first time after the group is formed
    keeps references to it for good; contrastlab imports it (through torchvision) before forming the group.
    """
    if _group_left_at_exit or getattr(sys, "last_value", None) is not None:
        return
    destroy()
    gc.collect()  # frees what still holds the group in a reference cycle (a trainer's DDP), so its threads end now


def barrier() -> None:
    """Synchronise all ranks (no-op in a single process)."""
    if is_initialized():
        dist.barrier()


def destroy() -> None:
    """Tear down the process group if one exists."""
    if is_initialized():
        dist.destroy_process_group()


def wrap_ddp(method: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """DDP around a method, told to leave alone the buffers the method keeps in sync itself.

    Queues and memories (``method.ddp_ignored_buffers()``) are identical on every rank by construction;
    DDP's default would re-broadcast them from rank 0 at every forward, a full copy per step.
    """
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        method, method.ddp_ignored_buffers())
    return nn.parallel.DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None)


def broadcast_ignored_buffers(method: nn.Module) -> None:
    """Copy rank 0's queues and memories to every rank (after building or resuming; no-op in one process)."""
    buffers = dict(method.named_buffers())
    own = set(method.rank_local_buffers()) if hasattr(method, "rank_local_buffers") else set()
    for name in method.ddp_ignored_buffers():
        if name not in own:  # a rank's own buffers (SwAV's queue) stay its own
            broadcast_(buffers[name], src=0)
