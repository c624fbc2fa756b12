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
from contrastlab.data.samplers import MPerClassSampler
from contrastlab.engine import distributed as dist
from contrastlab.engine.checkpoint import (
    FORMAT,
    VERSION,
    atomic_save,
    load_checkpoint,
    newest_intact_checkpoint,
    remove_checkpoint,
)
from contrastlab.engine.optim import build_optimizer, set_learning_rate
from contrastlab.engine.schedules import ema_momentum, epoch_learning_rate, learning_rate
from contrastlab.errors import ConfigError, ContrastlabError
from contrastlab.methods.base import Method
from contrastlab.observers.classification_monitor import ClassificationMonitor
from contrastlab.observers.metrics_log import MetricsLog
from contrastlab.observers.progress import Progress
from contrastlab.observers.tensorboard import TensorBoardLog
from contrastlab.views import seed_worker

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(ContrastlabError, FloatingPointError):
    """The loss became NaN or infinite."""


class CollapseError(ContrastlabError):
    """The kNN collapse guard stopped a run whose representation collapsed."""


SCHEDULE_UNITS = ("step", "epoch")


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


def _resolve_resume(cfg: Config, out: Path, log) -> Path | None:
    last = out / "checkpoints" / "last.pt"
    if cfg.resume == "auto":  # the newest intact checkpoint: a damaged last.pt falls back to epoch_NNNN.pt
        found = newest_intact_checkpoint(out / "checkpoints", log=log)
        if found is None and any((out / "checkpoints").glob("*.pt")):
            raise ContrastlabError(f"resume=auto: every checkpoint in {out / 'checkpoints'} is damaged (see above); "
                                   "pass overwrite=true to start afresh")
        return found
    if cfg.resume:
        return Path(cfg.resume)
    if last.is_file() and not cfg.overwrite:
        raise ConfigError(
            f"run directory {out} already holds a run ({last}); pass resume=auto to continue it, "
            "overwrite=true to start afresh there, or another out=DIR"
        )
    return None


SAMPLERS = ("random", "m_per_class")


def _loader(train_set, cfg: Config, d: Derived, rank: int, epoch: int, device: torch.device) -> DataLoader:
    g = torch.Generator().manual_seed(epoch_seed(cfg.seed, rank, epoch))
    common = {"num_workers": cfg.data.workers, "worker_init_fn": seed_worker, "generator": g,
              "pin_memory": device.type == "cuda"}
    if cfg.data.sampler == "m_per_class":  # every rank draws the same global batches and keeps its slice
        batches = MPerClassSampler(train_set.dataset.targets, m=cfg.data.samples_per_class,
                                   batch_size=d.global_batch_size, length_before_new_iter=cfg.data.epoch_length or None,
                                   seed=cfg.seed, num_replicas=d.world_size, rank=rank)
        batches.set_epoch(epoch)
        return DataLoader(train_set, batch_sampler=batches, **common)
    if d.world_size > 1:
        sampler = DistributedSampler(train_set, num_replicas=d.world_size, rank=rank, shuffle=True,
                                     seed=cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(train_set, generator=g)
    return DataLoader(train_set, batch_size=d.per_rank_batch_size, sampler=sampler, drop_last=True, **common)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def wrap_ddp(method: Method, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """DDP around ``method``, told to leave alone the buffers the method keeps in sync itself.

    Queues and memories (``method.ddp_ignored_buffers()``) are identical on every rank by construction;
    DDP's default would re-broadcast them from rank 0 at every forward, a full copy per step.
    """
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        method, method.ddp_ignored_buffers())
    return nn.parallel.DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None)


def broadcast_ignored_buffers(method: Method) -> None:
    """Copy rank 0's queues and memories to every rank (after building or resuming; no-op in one process)."""
    buffers = dict(method.named_buffers())
    for name in method.ddp_ignored_buffers():
        dist.broadcast_(buffers[name], src=0)


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
    if cfg.data.sampler not in SAMPLERS:
        raise ConfigError(f"data.sampler must be random or m_per_class, got {cfg.data.sampler!r}")
    if cfg.train.schedule_unit not in SCHEDULE_UNITS:
        raise ConfigError(f"train.schedule_unit must be step or epoch, got {cfg.train.schedule_unit!r}")
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)

    out = run_directory(cfg, recipe)
    resume_path = _resolve_resume(cfg, out, log)
    seed_everything(cfg.seed + rank)

    base_train = assemble.dataset(cfg, cfg.data.train_split)
    train_set = assemble.training_views(cfg, base_train)
    d = derive(cfg, world, len(train_set))
    num_classes = len(getattr(base_train, "classes", [])) or 1

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    method = assemble.method(cfg, num_classes, getattr(base_train, "targets", None)).to(device)
    if cfg.model.channels_last:
        method = method.to(memory_format=torch.channels_last)
    model: nn.Module = method
    if world > 1:
        if cfg.model.sync_bn:
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        model = wrap_ddp(method, device)
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
    broadcast_ignored_buffers(method)  # every rank starts from rank 0's queue / memory
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

    monitor = classifier_monitor = None
    mon = cfg.monitor
    if main and num_classes > 1:  # the training split's raw dataset doubles as the kNN bank (no second scan)
        test_base = assemble.dataset(cfg, cfg.data.test_split)
        monitor = assemble.knn_monitor(cfg, assemble.labeled_dataset(cfg, base_train), test_base, device,
                                       batch_size=max(64, d.per_rank_batch_size))
        if type(method).predict is not Method.predict:  # the method has classifiers: test-set accuracy too
            classifier_monitor = ClassificationMonitor(assemble.evaluation_views(cfg, test_base),
                                                       batch_size=max(64, d.per_rank_batch_size),
                                                       workers=cfg.data.workers, max_test=mon.max_test, device=device)

    log(f"training {recipe}: {len(train_set)} images, global batch {d.global_batch_size} on {world} rank(s), "
        f"lr {d.lr:.4g}, {d.total_steps} steps, device {device}, out {out}")
    progress = Progress(d.total_steps, d.global_batch_size, cfg.train.log_every, enabled=main and not quiet)
    milestones = tuple(m * d.steps_per_epoch for m in cfg.optim.milestones)
    per_epoch = cfg.train.schedule_unit == "epoch"
    mf = torch.channels_last if cfg.model.channels_last else torch.contiguous_format

    def train_step(views, labels, index, lr: float, where: str):
        """Forward, backward and optimiser step on one batch; the method's StepOutput."""
        set_learning_rate(optimizer, lr, d.lr)
        views = [v.to(device, non_blocking=True, memory_format=mf) for v in views]
        labels, index = labels.to(device), index.to(device)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
            result = model(views, labels, index)
        loss = result.loss
        if not torch.isfinite(loss.detach()):
            parts = {k: float(v) for k, v in result.parts.items()}
            raise NonFiniteLossError(f"loss is {loss.item()} at {where}; parts {parts}; "
                                     f"learning rate {lr:.4g}. Lower optim.lr or use train.precision=fp32.")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.optim.clip_grad > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(method.parameters(), cfg.optim.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        return result

    warm_steps = method.warm_start_steps(d.global_batch_size)
    if warm_steps:  # CaCo's memory fill: extra steps before epoch 1 at the peak rate, not counted in `step`
        log(f"warm start: {warm_steps} steps at lr {d.lr:.4g} before epoch 1")
        model.train()
        method.set_progress(0.0, cfg.train.epochs, per_epoch)
        done, passes = 0, 0
        while done < warm_steps:
            seed_everything(epoch_seed(cfg.seed, rank, passes))
            for views, labels, index in _loader(train_set, cfg, d, rank, passes, device):
                if done >= warm_steps:
                    break
                result = train_step(views, labels, index, d.lr, f"warm-start step {done}")
                method.after_optimizer_step(cfg.train.ema_momentum)
                done += 1
                if done % cfg.train.log_every == 0 or done == warm_steps:
                    parts = ", ".join(f"{k} {float(v):.4g}" for k, v in result.parts.items())
                    log(f"warm start step {done}/{warm_steps}: loss {result.loss.item():.4f}; {parts}")
            passes += 1

    knn_top1 = None
    epoch = start_epoch
    while step < d.total_steps:
        seed_everything(epoch_seed(cfg.seed, rank, epoch))
        loader = _loader(train_set, cfg, d, rank, epoch, device)
        model.train()
        loss_sum, loss_count, epoch_t0 = 0.0, 0, time.perf_counter()
        part_sums: dict[str, torch.Tensor] = {}
        progress.reset_clock(step)
        if per_epoch:
            epoch_lr = epoch_learning_rate(epoch, base_lr=d.lr, total_epochs=cfg.train.epochs,
                                           warmup_epochs=cfg.optim.warmup_epochs, schedule=cfg.optim.schedule,
                                           final_lr=d.final_lr, milestones=tuple(cfg.optim.milestones),
                                           gamma=cfg.optim.gamma)
        for i, (views, labels, index) in enumerate(loader):
            if i >= d.steps_per_epoch or step >= d.total_steps:
                break
            if per_epoch:
                lr = epoch_lr
                method.set_progress(float(epoch), cfg.train.epochs, True)
            else:
                lr = learning_rate(step, base_lr=d.lr, total_steps=d.total_steps, warmup_steps=d.warmup_steps,
                                   schedule=cfg.optim.schedule, warmup_start_lr=d.warmup_start_lr,
                                   final_lr=d.final_lr, milestones_steps=milestones, gamma=cfg.optim.gamma)
                method.set_progress(step / d.steps_per_epoch, cfg.train.epochs, False)
            result = train_step(views, labels, index, lr, f"step {step} (epoch {epoch})")
            step += 1
            # The EMA after step t prepares the keys of step t + 1: per epoch, the momentum of that step's epoch.
            ema_step = (step // d.steps_per_epoch) * d.steps_per_epoch if per_epoch else step
            method.after_optimizer_step(ema_momentum(ema_step, base=cfg.train.ema_momentum,
                                                     total_steps=d.total_steps, schedule=cfg.train.ema_schedule))
            loss_value = result.loss.item()
            loss_sum += loss_value
            loss_count += 1
            for key, value in result.parts.items():
                value = value.detach().float().to(device)
                part_sums[key] = part_sums[key] + value if key in part_sums else value
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
        if part_sums:
            record["parts"] = {k: dist.all_reduce_mean(v / max(1, loss_count)).item() for k, v in part_sums.items()}
        last_epoch = step >= d.total_steps
        collapsed = torch.zeros((), device=device)
        evaluate = last_epoch or (mon.knn_every > 0 and epoch % mon.knn_every == 0) or epoch <= mon.knn_every_epoch_until
        if monitor is not None and evaluate:
            knn_top1 = monitor.evaluate(_unwrap(model).backbone)
            record["knn_top1"] = knn_top1
            log(f"epoch {epoch}: kNN top-1 {knn_top1:.2f}% ({monitor.label()})")
            if mon.collapse_threshold > 0 and epoch >= mon.collapse_after_epoch and knn_top1 <= mon.collapse_threshold:
                collapsed.fill_(1.0)
        if classifier_monitor is not None and (last_epoch or (mon.classify_every > 0 and epoch % mon.classify_every == 0)):
            test_top1 = classifier_monitor.evaluate(_unwrap(model))
            record["test_top1"] = test_top1
            log(f"epoch {epoch}: test top-1 " + ", ".join(f"{k} {v:.2f}%" for k, v in test_top1.items()))
        dist.barrier()
        if main:
            metrics.write(record)
            tb.scalars({k: v for k, v in record.items() if not isinstance(v, dict)}, epoch, "epoch/")
            tb.scalars(record.get("parts", {}), epoch, "parts/")
            tb.scalars(record.get("test_top1", {}), epoch, "test_top1/")
            ckpt = {"format": FORMAT, "version": VERSION, "config": dump_config(cfg), "recipe": recipe,
                    "epoch": epoch, "step": step, "method": method.state_dict(),
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(),
                    "derived": d.as_dict()}
            atomic_save(ckpt, out / "checkpoints" / "last.pt")
            if cfg.train.checkpoint_every > 0 and epoch % cfg.train.checkpoint_every == 0:
                atomic_save(ckpt, out / "checkpoints" / f"epoch_{epoch:04d}.pt")
                if cfg.train.keep_checkpoints > 0:
                    for old in sorted((out / "checkpoints").glob("epoch_*.pt"))[:-cfg.train.keep_checkpoints]:
                        remove_checkpoint(old)
        dist.barrier()
        if dist.broadcast_(collapsed, src=0).item():
            raise CollapseError(
                f"kNN top-1 is {knn_top1 if knn_top1 is not None else 'at chance'}% at epoch {epoch}, at or below "
                f"monitor.collapse_threshold={mon.collapse_threshold}%: the representation has collapsed, so the "
                f"run stops (checkpoint {out / 'checkpoints' / 'last.pt'} kept). Lower optim.lr or the method's "
                "memory/queue learning rate, or set monitor.collapse_threshold=0 to disable the guard.")

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
        if classifier_monitor is not None and history and "test_top1" in history[-1]:
            results["test_top1"] = history[-1]["test_top1"]  # the final epoch's, never a selected epoch
            results.update(classifier_monitor.describe())
        if cfg.monitor.plots and history:
            from contrastlab.viz.curves import plot_training_curves

            plot_training_curves(history, out / "plots")
        (out / "results.json").write_text(json.dumps(results, indent=2))
    tb.close()
    dist.barrier()
    if math.isnan(results.get("final_loss", 0.0)):
        raise NonFiniteLossError("final loss is NaN")
    return results
