"""The training loop: one function, :func:`train`, from a validated config to a finished run directory.

Run directory layout::

    <out>/config.yaml        the resolved config (re-runnable: ``contrastlab train <out>/config.yaml``)
    <out>/run.json           derived values (scaled lr, steps), world size, device, versions
    <out>/metrics.jsonl      one JSON object per epoch
    <out>/tensorboard/       TensorBoard events
    <out>/checkpoints/       last.pt every epoch, epoch_NNNN.pt every ``train.checkpoint_every`` epochs
    <out>/plots/             training curves (PNG), written at the end
    <out>/results.json       final kNN accuracy and how it was measured

Determinism: every epoch re-seeds the samplers, the data workers and the global RNGs from
``(seed, rank, epoch)``, so a run resumed from an epoch checkpoint continues the same sequence of
batches, augmentations and losses as the uninterrupted run.
"""

from __future__ import annotations

import json
import math
import platform
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from contrastlab import __version__, assemble
from contrastlab.config.derived import Derived, derive
from contrastlab.config.load import dump_config
from contrastlab.config.schema import Config
from contrastlab.engine import distributed as dist
from contrastlab.engine.checkpoint import FORMAT, VERSION, atomic_save, load_checkpoint
from contrastlab.engine.optim import build_optimizer, set_learning_rate
from contrastlab.engine.schedules import ema_momentum, learning_rate
from contrastlab.errors import ConfigError, ContrastlabError
from contrastlab.observers.metrics_log import MetricsLog
from contrastlab.observers.progress import Progress
from contrastlab.observers.tensorboard import TensorBoardLog
from contrastlab.views import seed_worker

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(ContrastlabError, FloatingPointError):
    """The loss became NaN or infinite."""


def select_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when available; ConfigError when ``cuda`` is asked for and missing."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ConfigError(f"train.device must be auto, cpu or cuda, got {name!r}")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """A distinct, reproducible seed for each (run seed, rank, epoch)."""
    return (seed * 1_000_003 + rank * 10_007 + epoch * 101 + 17) % 2**63


def run_directory(cfg: Config, recipe: str) -> Path:
    """``cfg.out`` or ``runs/<recipe name>``."""
    return Path(cfg.out) if cfg.out else Path("runs") / Path(recipe).with_suffix("").as_posix().replace("/", "_")


def _resolve_resume(cfg: Config, out: Path) -> Path | None:
    last = out / "checkpoints" / "last.pt"
    if cfg.resume == "auto":
        return last if last.is_file() else None
    if cfg.resume:
        return Path(cfg.resume)
    if last.is_file() and not cfg.overwrite:
        raise ConfigError(
            f"run directory {out} already holds a run ({last}); pass resume=auto to continue it, "
            "overwrite=true to start afresh there, or another out=DIR"
        )
    return None


def _loader(train_set, cfg: Config, d: Derived, rank: int, epoch: int, device: torch.device) -> DataLoader:
    g = torch.Generator().manual_seed(epoch_seed(cfg.seed, rank, epoch))
    if d.world_size > 1:
        sampler = DistributedSampler(train_set, num_replicas=d.world_size, rank=rank, shuffle=True,
                                     seed=cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(train_set, generator=g)
    return DataLoader(train_set, batch_size=d.per_rank_batch_size, sampler=sampler, drop_last=True,
                      num_workers=cfg.data.workers, worker_init_fn=seed_worker, generator=g,
                      pin_memory=device.type == "cuda")


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train(cfg: Config, recipe: str = "run", *, quiet: bool = False) -> dict[str, Any]:
    """Train ``cfg`` to the end (or ``train.max_steps``) and return the final results.

    Works in a single process and under ``torchrun`` (one process per device; ``data.batch_size`` is the
    global batch, split over ranks; the learning rate is scaled from the global batch).
    """
    denv = dist.init_distributed(select_device(cfg.train.device).type)
    rank, world = denv.rank, denv.world_size
    device = select_device(cfg.train.device, denv.local_rank)
    main = rank == 0
    log = (lambda *a: None) if (quiet or not main) else (lambda *a: print(*a, file=sys.stderr, flush=True))
    if cfg.train.precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {cfg.train.precision!r}")
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)

    out = run_directory(cfg, recipe)
    resume_path = _resolve_resume(cfg, out)
    seed_everything(cfg.seed + rank)

    base_train = assemble.dataset(cfg, cfg.data.train_split)
    train_set = assemble.training_views(cfg, base_train)
    d = derive(cfg, world, len(train_set))
    num_classes = len(getattr(base_train, "classes", [])) or 1

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    method = assemble.method(cfg, num_classes).to(device)
    if cfg.model.channels_last:
        method = method.to(memory_format=torch.channels_last)
    model: nn.Module = method
    if world > 1:
        if cfg.model.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            method = model
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(method.param_groups(), cfg.optim, d.lr)
    amp_dtype = PRECISIONS[cfg.train.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16" and device.type == "cuda")

    metrics = MetricsLog(out / "metrics.jsonl")
    start_epoch, step = 0, 0
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path, map_location=device)
        method.load_state_dict(ckpt["method"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        log(f"resumed from {resume_path} at epoch {start_epoch}, step {step}")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
        (out / "run.json").write_text(json.dumps({
            "recipe": recipe, "derived": d.as_dict(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "contrastlab": __version__, "python": platform.python_version(),
        }, indent=2))
        if resume_path is None:
            metrics.path.unlink(missing_ok=True)
        else:
            metrics.truncate_after(start_epoch)
    tb = TensorBoardLog(out / "tensorboard", enabled=main)

    monitor = None
    mon = cfg.monitor
    if main and num_classes > 1:  # the training split's raw dataset doubles as the kNN bank (no second scan)
        monitor = assemble.knn_monitor(cfg, base_train, assemble.dataset(cfg, cfg.data.test_split), device,
                                       batch_size=max(64, d.per_rank_batch_size))

    log(f"training {recipe}: {len(train_set)} images, global batch {d.global_batch_size} on {world} rank(s), "
        f"lr {d.lr:.4g}, {d.total_steps} steps, device {device}, out {out}")
    progress = Progress(d.total_steps, d.global_batch_size, cfg.train.log_every, enabled=main and not quiet)
    milestones = tuple(m * d.steps_per_epoch for m in cfg.optim.milestones)
    knn_top1 = None
    epoch = start_epoch
    while step < d.total_steps:
        seed_everything(epoch_seed(cfg.seed, rank, epoch))
        loader = _loader(train_set, cfg, d, rank, epoch, device)
        model.train()
        loss_sum, loss_count, epoch_t0 = 0.0, 0, time.perf_counter()
        progress.reset_clock(step)
        for i, (views, labels, index) in enumerate(loader):
            if i >= d.steps_per_epoch or step >= d.total_steps:
                break
            lr = learning_rate(step, base_lr=d.lr, total_steps=d.total_steps, warmup_steps=d.warmup_steps,
                               schedule=cfg.optim.schedule, warmup_start_lr=cfg.optim.warmup_start_lr,
                               final_lr=cfg.optim.final_lr, milestones_steps=milestones, gamma=cfg.optim.gamma)
            set_learning_rate(optimizer, lr, d.lr)
            mf = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
            views = [v.to(device, non_blocking=True, memory_format=mf) for v in views]
            labels, index = labels.to(device), index.to(device)
            autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
            with autocast:
                result = model(views, labels, index)
            loss = result.loss
            if not torch.isfinite(loss.detach()):
                parts = {k: float(v) for k, v in result.parts.items()}
                raise NonFiniteLossError(f"loss is {loss.item()} at step {step} (epoch {epoch}); parts {parts}; "
                                         f"learning rate {lr:.4g}. Lower optim.lr or use train.precision=fp32.")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.optim.clip_grad > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(method.parameters(), cfg.optim.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            method.after_optimizer_step(ema_momentum(step, base=cfg.train.ema_momentum, total_steps=d.total_steps,
                                                     schedule=cfg.train.ema_schedule))
            loss_value = loss.item()
            loss_sum += loss_value
            loss_count += 1
            progress.update(step, epoch + 1, loss_value, lr)
            if main and (step % cfg.train.log_every == 0):
                tb.scalars({"loss": loss_value, "lr": lr}, step, "train/")
        epoch += 1
        elapsed = time.perf_counter() - epoch_t0
        record: dict[str, Any] = {
            "epoch": epoch, "step": step,
            "loss": dist.all_reduce_mean(torch.tensor(loss_sum / max(1, loss_count))).item(),
            "lr": optimizer.param_groups[0]["lr"],
            "img_per_s": loss_count * d.global_batch_size / elapsed if elapsed > 0 else 0.0,
        }
        last_epoch = step >= d.total_steps
        if monitor is not None and (last_epoch or (mon.knn_every > 0 and epoch % mon.knn_every == 0)):
            knn_top1 = monitor.evaluate(_unwrap(model).backbone)
            record["knn_top1"] = knn_top1
            log(f"epoch {epoch}: kNN top-1 {knn_top1:.2f}% (k={mon.knn_k}, T={mon.knn_temperature}, backbone features)")
        dist.barrier()
        if main:
            metrics.write(record)
            tb.scalars(record, epoch, "epoch/")
            ckpt = {"format": FORMAT, "version": VERSION, "config": dump_config(cfg), "recipe": recipe,
                    "epoch": epoch, "step": step, "method": method.state_dict(),
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(),
                    "derived": d.as_dict()}
            atomic_save(ckpt, out / "checkpoints" / "last.pt")
            if cfg.train.checkpoint_every > 0 and epoch % cfg.train.checkpoint_every == 0:
                atomic_save(ckpt, out / "checkpoints" / f"epoch_{epoch:04d}.pt")
        dist.barrier()

    results: dict[str, Any] = {"recipe": recipe, "out": str(out), "epochs": epoch, "steps": step}
    if main:
        history = metrics.read()
        if history:
            results["final_loss"] = history[-1]["loss"]
        if knn_top1 is None and monitor is not None:
            knn_top1 = monitor.evaluate(_unwrap(model).backbone)
        if monitor is not None:
            results["knn_top1"] = knn_top1
            results.update(monitor.describe())
        if cfg.monitor.plots and history:
            from contrastlab.viz.curves import plot_training_curves

            plot_training_curves(history, out / "plots")
        (out / "results.json").write_text(json.dumps(results, indent=2))
    tb.close()
    dist.barrier()
    if math.isnan(results.get("final_loss", 0.0)):
        raise NonFiniteLossError("final loss is NaN")
    return results
