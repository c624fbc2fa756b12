"""The training loop: :func:`train`, from a validated config to a finished run directory (:class:`Trainer`).

Run directory layout::

    <out>/config.yaml        the resolved config (re-runnable: ``contrastlab train <out>/config.yaml``)
    <out>/run.json           derived values (scaled lr, steps), world size, device, input pipeline, versions
    <out>/metrics.jsonl      one JSON object per epoch
    <out>/tensorboard/       TensorBoard events
    <out>/checkpoints/       last.pt (every epoch, and every ``train.checkpoint_every_steps`` steps),
                             epoch_NNNN.pt every ``train.checkpoint_every`` epochs, each with a .sha256
    <out>/plots/             training curves (PNG), written at the end
    <out>/results.json       final accuracies and how they were measured
    <out>/run.lock           held by the running trainer (host, pid, start, heartbeat); see engine.run_lock

Determinism and resuming: an epoch's batches are a pure function of ``(seed, rank, epoch)``
(:func:`epoch_batches`), each image's views of ``(seed, epoch, index)`` (``ViewDataset(seed=...)``), and
the global RNGs are re-seeded at every epoch start. A checkpoint written in the middle of an epoch (by
``train.checkpoint_every_steps`` or a preemption signal) also holds every rank's RNG state, position in
the epoch and partial epoch sums, so a resumed run continues the same sequence of batches, views and
losses as the uninterrupted one (bit for bit on the CPU with ``train.deterministic``).

Faults: SIGTERM / SIGUSR1 checkpoint at the next step boundary and stop with exit status 75
(:mod:`contrastlab.engine.preemption`); under ``torchrun --max-restarts`` a restarted job resumes from its
last checkpoint by itself; a non-finite loss or gradient stops the run with a message, or skips the step
(``train.nonfinite=skip``, counted in ``metrics.jsonl``).
"""

from __future__ import annotations

import json
import math
import platform
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from contrastlab import __version__, assemble
from contrastlab.config.derived import Derived, derive
from contrastlab.config.load import config_from_dict, config_to_dict, dump_config
from contrastlab.config.schema import Config
from contrastlab.data.device_images import DeviceImages, decoded_per_batch, fits_on_device, image_shape
from contrastlab.data.device_loader import DeviceEvalLoader, DeviceViewLoader, FileViewLoader
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
from contrastlab.engine.preemption import PreemptedError, PreemptionSignals
from contrastlab.engine.run_lock import lock_run_directory
from contrastlab.engine.schedules import ema_momentum, epoch_learning_rate, learning_rate
from contrastlab.errors import ConfigError, ContrastlabError
from contrastlab.methods.base import Method, StepOutput
from contrastlab.observers.classification_monitor import ClassificationMonitor
from contrastlab.observers.metrics_log import MetricsLog
from contrastlab.observers.progress import Progress
from contrastlab.observers.score_statistics import ScoreStatistics
from contrastlab.observers.tensorboard import TensorBoardLog
from contrastlab.views import eval_view_dataset, seed_worker
from contrastlab.views.batch_views import BatchViews
from contrastlab.views.localiser import last_feature_map, localise

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(ContrastlabError, FloatingPointError):
    """The loss became NaN or infinite."""


class CollapseError(ContrastlabError):
    """The kNN collapse guard stopped a run whose representation collapsed."""




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


def _resolve_resume(cfg: Config, out: Path, log, device: torch.device) -> Path | None:
    last = out / "checkpoints" / "last.pt"
    resume = cfg.resume
    if dist.restarted_by_torchrun(device) and resume is None:  # collective: every rank resumes, or none
        log("torchrun restarted this job: resuming from its last checkpoint")
        resume = "auto"
    if resume == "auto":  # the newest intact checkpoint: a damaged last.pt falls back to epoch_NNNN.pt
        found = newest_intact_checkpoint(out / "checkpoints", log=log)
        if found is None and any((out / "checkpoints").glob("*.pt")):
            raise ContrastlabError(f"resume=auto: every checkpoint in {out / 'checkpoints'} is damaged (see above); "
                                   "pass overwrite=true to start afresh")
        return found
    if resume:
        return Path(resume)
    if last.is_file() and not cfg.overwrite:
        raise ConfigError(
            f"run directory {out} already holds a run ({last}); pass resume=auto to continue it, "
            "overwrite=true to start afresh there, or another out=DIR"
        )
    return None




def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (CUDA out of memory, or the CPU allocator refusing a size)."""
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """``torch.compile`` of ``model`` for ``train.compile``: an inductor mode, or ``eager`` (Dynamo tracing only,
    to check that a method compiles without paying for code generation)."""
    if mode == "eager":
        return torch.compile(model, backend="eager")
    return torch.compile(model, mode=mode)


def epoch_batches(targets, num_samples: int, cfg: Config, d: Derived, rank: int, epoch: int) -> list[list[int]]:
    """This rank's batches of dataset indices for ``epoch``, a pure function of ``(seed, epoch, rank)``.

    ``random``: a permutation per epoch (one process: ``torch.randperm`` seeded per ``(seed, rank, epoch)``,
    as ``RandomSampler``; several ranks: ``DistributedSampler``'s split of a permutation seeded by
    ``seed + epoch``); ``m_per_class``: :class:`~contrastlab.data.samplers.MPerClassSampler`. Only whole
    batches are kept, ``d.steps_per_epoch`` of them. Being explicit, the list can be resumed mid-epoch.
    """
    if cfg.data.sampler == "m_per_class":  # every rank draws the same global batches and keeps its slice
        sampler = MPerClassSampler(targets, m=cfg.data.samples_per_class, batch_size=d.global_batch_size,
                                   length_before_new_iter=cfg.data.epoch_length or None, seed=cfg.seed,
                                   num_replicas=d.world_size, rank=rank)
        sampler.set_epoch(epoch)
        return list(sampler)[: d.steps_per_epoch]
    if d.world_size > 1:
        dist_sampler = DistributedSampler(range(num_samples), num_replicas=d.world_size, rank=rank, shuffle=True,
                                          seed=cfg.seed, drop_last=True)
        dist_sampler.set_epoch(epoch)
        order = list(dist_sampler)
    else:
        g = torch.Generator().manual_seed(epoch_seed(cfg.seed, rank, epoch))
        order = torch.randperm(num_samples, generator=g).tolist()
    b = d.per_rank_batch_size
    return [order[i * b:(i + 1) * b] for i in range(min(d.steps_per_epoch, len(order) // b))]


def _loader(train_set, batches: list[list[int]], cfg: Config, rank: int, epoch: int,
            device: torch.device) -> DataLoader:
    """A DataLoader over ``batches``; views are seeded per sample, so workers need no seeding of their own."""
    train_set.set_epoch(epoch)
    return DataLoader(train_set, batch_sampler=batches, num_workers=cfg.data.workers, worker_init_fn=seed_worker,
                      generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, rank, epoch)),
                      pin_memory=device.type == "cuda")


def _rng_state() -> dict[str, Any]:
    """This process's global RNG states (torch, CUDA, NumPy, Python)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


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


def _set_bad_images(dataset, cfg: Config, log: Path) -> None:
    """Apply ``data.bad_images`` to a dataset of image files (others have nothing to skip)."""
    if hasattr(dataset, "set_bad_images"):
        log.parent.mkdir(parents=True, exist_ok=True)
        dataset.set_bad_images(cfg.data.bad_images, log)


@dataclass
class EpochProgress:
    """Where one rank stands inside the current epoch: saved in mid-epoch checkpoints."""

    batch: int = 0  #: batches of this epoch already trained
    loss_sum: float = 0.0
    loss_count: int = 0
    skipped: int = 0  #: steps skipped for a non-finite loss or gradient (train.nonfinite=skip)
    part_sums: dict[str, float] = field(default_factory=dict)


class Trainer:
    """One training run: built from a config, then :meth:`run` (see the module docstring).

    Works in a single process and under ``torchrun`` (one process per device; ``data.batch_size`` is the
    global batch, split over ranks; the learning rate is scaled from the global batch).
    """

    def __init__(self, cfg: Config, recipe: str = "run", *, quiet: bool = False) -> None:
        self.cfg, self.recipe = cfg, recipe
        denv = dist.init_distributed(select_device(cfg.train.device).type)
        self.rank, self.world = denv.rank, denv.world_size
        self.device = select_device(cfg.train.device, denv.local_rank)
        self.main = self.rank == 0
        self.quiet = quiet
        config_from_dict(config_to_dict(cfg))  # a config built in Python gets the checks of a loaded one
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)

        self.out = run_directory(cfg, recipe)
        # One trainer per run directory: rank 0 holds <out>/run.lock until close() (engine.run_lock).
        self.run_lock = lock_run_directory(self.out, cfg.train.lock_timeout, self.log, self.main,
                                           lambda flag: dist.any_rank(flag, self.device), " ".join(sys.argv)[:300])
        try:
            self._build(cfg)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg: Config) -> None:
        """The rest of set-up, with the run directory locked."""
        resume_path = _resolve_resume(cfg, self.out, self.log, self.device)
        seed_everything(cfg.seed + self.rank)
        base_train = self.base_train = assemble.training_dataset(cfg)
        self.bad_image_log = self.out / "bad_images.txt"
        if self.main and resume_path is None:
            self.bad_image_log.unlink(missing_ok=True)
        _set_bad_images(base_train, cfg, self.bad_image_log)
        self.targets = getattr(base_train, "targets", None)
        self.train_set = assemble.training_views(cfg, base_train)
        self.device_views = self._device_pipeline(base_train)
        self.d = d = derive(cfg, self.world, len(self.train_set))
        num_classes = len(getattr(base_train, "classes", [])) or 1

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        try:
            method = assemble.method(cfg, num_classes, self.targets).to(self.device)
        except RuntimeError as exc:  # torch.OutOfMemoryError (CUDA) is one too
            if not _out_of_memory(exc):
                raise
            raise ConfigError(f"building the model ran out of memory on {self.device} ({str(exc).splitlines()[0]}); "
                              f"model.arch={cfg.model.arch}, model.width={cfg.model.width}, "
                              f"model.peers={cfg.model.peers}, method.name={cfg.method.name}: choose a smaller model "
                              "or method setting (a queue or memory size)") from exc
        if cfg.model.channels_last:
            method = method.to(memory_format=torch.channels_last)
        self.model: nn.Module = method
        if self.world > 1:
            if cfg.model.sync_bn:
                method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
            self.model = wrap_ddp(method, self.device)
        if cfg.train.compile != "none":  # the step's forward compiled; checkpoints keep reading self.method
            self.model = compile_model(self.model, cfg.train.compile)
        self.method = method
        self.optimizer = build_optimizer(method.param_groups(), cfg.optim, d.lr)
        self.amp_dtype = PRECISIONS[cfg.train.precision]
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=cfg.train.precision == "fp16" and self.device.type == "cuda")
        self.per_epoch = cfg.train.schedule_unit == "epoch"
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format

        law = self.train_set.planner
        self.localisation = law.localisation  # a box store a localiser refreshes (ContrastiveCrop, SemanticCrop)
        self.box_store = law.store if self.localisation is not None else None
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        self.epoch, self.step = 0, 0
        self.progress_in_epoch = EpochProgress()
        self._pending: list[tuple[torch.Tensor, dict[str, Any]]] = []  # step losses not yet read to the host
        self._nonfinite_pending: torch.Tensor | None = None  # train.finite_check_every > 1
        self._unchecked_since = 0
        self.resumed_mid_epoch = False
        self.skipped_total = 0
        if resume_path is not None:
            self._load(resume_path)
        broadcast_ignored_buffers(method)  # every rank starts from rank 0's queue / memory
        self._prepare_run_directory(resume_path)
        self.tb = TensorBoardLog(self.out / "tensorboard", enabled=self.main)

        self.knn = self.classifier_monitor = None
        if self.main and num_classes > 1:  # the training split's raw dataset doubles as the kNN bank
            test_base = assemble.dataset(cfg, cfg.data.test_split)
            _set_bad_images(test_base, cfg, self.bad_image_log)
            batch = max(64, d.per_rank_batch_size)
            on_device = self._evaluate_on_device(test_base)
            bank_base = assemble.labeled_dataset(cfg, base_train)
            store = getattr(self.device_views, "store", None) if bank_base is base_train else None  # held images
            self.knn = assemble.knn_monitor(cfg, bank_base, test_base, self.device, batch_size=batch,
                                            on_device=on_device, store=store)
            if type(method).predict is not Method.predict:  # the method has classifiers: test accuracy too
                self.classifier_monitor = ClassificationMonitor(self.knn.test_loader, self.device)
        self.progress = Progress(d.total_steps, d.global_batch_size, cfg.train.log_every,
                                 enabled=self.main and not self.quiet)
        self.knn_top1: float | None = None
        self.scores = None
        if cfg.monitor.score_stats:
            if method.logit_temperature is None:
                raise ConfigError(f"monitor.score_stats needs a contrastive method with logits; {cfg.method.name!r} "
                                  "has none")
            self.scores = ScoreStatistics(self.out / "scores", rank=self.rank)
            for old in (self.out / "scores").glob(f"epoch_*.rank{self.rank}.npz"):  # epochs after the checkpoint
                if int(old.name.split("_")[1].split(".")[0]) > self.epoch:
                    old.unlink()
            if self.resumed_mid_epoch and "scores" in self._rng_to_restore:
                self.scores.load_pending_state(self._rng_to_restore["scores"])

    # --- set-up --------------------------------------------------------------------------------------------

    def log(self, *args: object) -> None:
        if self.main and not self.quiet:
            print(*args, file=sys.stderr, flush=True)

    def _device_pipeline(self, base) -> DeviceViewLoader | FileViewLoader | None:
        """``data.pipeline``: the dataset on the device with batched views, or None for CPU DataLoader workers."""
        choice = self.cfg.data.pipeline
        if choice == "cpu":
            return None
        if choice == "auto":
            fits, why = fits_on_device(base, self.device)
            if not fits:
                self.log(f"data.pipeline=auto: views rendered in {self.cfg.data.workers} CPU workers ({why})")
                return None
        views = BatchViews.from_view_dataset(self.train_set, compile=self.cfg.data.compile_views)
        views.log = self.log
        if decoded_per_batch(base):  # files of various sizes
            self.log(f"data.pipeline: {self.cfg.data.workers} workers read the image files, {self.device} decodes "
                     "and renders each batch")
            return FileViewLoader(base, views, self.device, self.cfg.seed, self.rank, self.cfg.data.workers)
        t0 = time.perf_counter()
        store = DeviceImages.from_dataset(base, self.device)
        loader = DeviceViewLoader(store, views, self.cfg.seed, self.rank)
        if choice == "auto":  # a trial batch first: auto falls back to the CPU workers rather than fail a run
            try:
                views.compile = False  # the trial runs eagerly: compiling for its batch shape would be wasted
                next(iter(loader([list(range(min(len(store), 8)))], epoch=-1)))
                views.compile = self.cfg.data.compile_views
            except Exception as exc:  # noqa: BLE001 - any failure of the GPU path means: use the CPU path
                self.log(f"data.pipeline=auto: the GPU pipeline failed a trial batch ({type(exc).__name__}: {exc}); "
                         f"views rendered in {self.cfg.data.workers} CPU workers instead. Set data.pipeline=gpu to "
                         "see the full error.")
                return None
        self.log(f"data.pipeline: {len(store)} images ({store.nbytes / 2**20:.0f} MiB) held on {self.device} in "
                 f"{time.perf_counter() - t0:.1f} s; views rendered there in batches")
        return loader

    def _evaluate_on_device(self, test_base) -> bool:
        """Whether the monitors render their evaluation views on the device: when the training views are made
        there, and the test split can be held there too (its size known without decoding) or is image files."""
        if isinstance(self.device_views, FileViewLoader):
            return True
        return isinstance(self.device_views, DeviceViewLoader) and image_shape(test_base) is not None

    def _pipeline_name(self) -> str:
        """What feeds the steps, for run.json: ``gpu-resident``, ``gpu-files`` or ``cpu-workers``."""
        if isinstance(self.device_views, DeviceViewLoader):
            return "gpu-resident"
        return "gpu-files" if isinstance(self.device_views, FileViewLoader) else "cpu-workers"

    def _batches(self, batches: list[list[int]], epoch: int, start: int = 0):
        """``(views, labels, index)`` of ``batches`` (batch number ``start`` of ``epoch`` first), from either pipeline."""
        if self.device_views is not None:
            return self.device_views(batches, epoch, start)
        return _loader(self.train_set, batches, self.cfg, self.rank, epoch, self.device)

    def _load(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location=self.device)
        self.method.load_state_dict(ckpt["method"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # an imported checkpoint (contrastlab import) has no loss-scaler state
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        if self.step is None:  # imported: upstream counts epochs only
            self.step = self.epoch * self.d.steps_per_epoch
        self.skipped_total = ckpt.get("skipped_total", 0)
        if self.box_store is not None and "box_store" in ckpt:
            self.box_store.load_state_dict(ckpt["box_store"])
        partial = ckpt.get("partial")
        if partial is not None:  # written mid-epoch: this rank's place, sums and random state
            if len(partial) != self.world:
                raise ContrastlabError(f"{path} was written mid-epoch by {len(partial)} rank(s); resume it with "
                                       f"{len(partial)} rank(s), or from an end-of-epoch checkpoint (epoch_NNNN.pt)")
            mine = partial[self.rank]
            self.progress_in_epoch = EpochProgress(**mine["progress"])
            self._rng_to_restore = mine["rng"]
            self.resumed_mid_epoch = True
            ft = getattr(self.method, "feature_transform", None)
            if ft is not None:
                ft.set_random_state(mine["rng"].get("feature_transform"))
        where = f", batch {self.progress_in_epoch.batch} of epoch {self.epoch + 1}" if partial else ""
        self.log(f"resumed from {path} at epoch {self.epoch}, step {self.step}{where}")

    def _rng_states(self) -> dict[str, Any]:
        """Global RNG states plus the method's own streams (Feature Transformation's) and the score
        statistics recorded so far in this epoch: what a mid-epoch resume needs to continue exactly."""
        state = _rng_state()
        ft = getattr(self.method, "feature_transform", None)
        if ft is not None:
            state["feature_transform"] = ft.random_state()
        if self.scores is not None:
            state["scores"] = self.scores.pending_state()
        return state

    def _prepare_run_directory(self, resume_path: Path | None) -> None:
        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(dump_config(self.cfg))
        device = self.device
        (self.out / "run.json").write_text(json.dumps({
            "recipe": self.recipe, "derived": self.d.as_dict(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "contrastlab": __version__, "python": platform.python_version(),
            "input_pipeline": self._pipeline_name(),
            "views_compiled": self.device_views is not None and self.cfg.data.compile_views,
        }, indent=2))
        if resume_path is None:
            self.metrics.path.unlink(missing_ok=True)
        else:
            self.metrics.truncate_after(self.epoch)

    # --- one step ------------------------------------------------------------------------------------------

    def _learning_rate(self) -> float:
        cfg, d = self.cfg, self.d
        if self.per_epoch:
            self.method.set_progress(float(self.epoch), cfg.train.epochs, True)
            return epoch_learning_rate(self.epoch, base_lr=d.lr, total_epochs=cfg.train.epochs,
                                       warmup_epochs=cfg.optim.warmup_epochs, schedule=cfg.optim.schedule,
                                       final_lr=d.final_lr, milestones=tuple(cfg.optim.milestones),
                                       gamma=cfg.optim.gamma)
        self.method.set_progress(self.step / d.steps_per_epoch, cfg.train.epochs, False)
        return learning_rate(self.step, base_lr=d.lr, total_steps=d.total_steps, warmup_steps=d.warmup_steps,
                             schedule=cfg.optim.schedule, warmup_start_lr=d.warmup_start_lr, final_lr=d.final_lr,
                             milestones_steps=tuple(m * d.steps_per_epoch for m in cfg.optim.milestones),
                             gamma=cfg.optim.gamma)

    def _gradients_finite_flag(self) -> torch.Tensor:
        """A device bool: every gradient is finite (always true under fp16, whose scaler skips bad steps itself)."""
        grads = [p.grad for p in self.method.parameters() if p.grad is not None]
        if self.scaler.is_enabled() or not grads:
            return torch.ones((), dtype=torch.bool, device=self.device)
        return torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()

    def _gradients_finite(self) -> bool:
        return bool(self._gradients_finite_flag())

    def _train_step(self, views, labels, index, lr: float, where: str) -> StepOutput | None:
        """Forward, backward and optimiser step on one batch; ``None`` when the step was skipped."""
        cfg = self.cfg
        set_learning_rate(self.optimizer, lr, self.d.lr)
        views = [v.to(self.device, non_blocking=True, memory_format=self.memory_format) for v in views]
        labels, index = labels.to(self.device), index.to(self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext():
            result = self.model(views, labels, index)
        loss = result.loss
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.train.finite_check_every > 1:  # no host read: the flag is checked every N steps
            self.scaler.scale(loss).backward()
            if cfg.optim.clip_grad > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.method.parameters(), cfg.optim.clip_grad)
            flag = ~torch.isfinite(loss.detach()) | ~self._gradients_finite_flag()
            pending = self._nonfinite_pending
            self._nonfinite_pending = flag if pending is None else pending | flag
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return result
        loss_ok = bool(torch.isfinite(loss.detach()))
        if loss_ok:
            self.scaler.scale(loss).backward()
            if cfg.optim.clip_grad > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.method.parameters(), cfg.optim.clip_grad)
        bad = dist.any_rank(not (loss_ok and self._gradients_finite()), self.device)
        if bad:
            parts = {k: round(float(v), 6) for k, v in result.parts.items()}
            what = f"loss {loss.item()}" if not loss_ok else "a gradient is not finite"
            message = f"{what} at {where}; loss parts {parts}; learning rate {lr:.4g}"
            if cfg.train.nonfinite == "stop" or self.skipped_total >= cfg.train.max_skipped_steps:
                limit = "" if cfg.train.nonfinite == "stop" else f" ({self.skipped_total} steps skipped already)"
                raise NonFiniteLossError(f"{message}{limit}. Lower optim.lr, use train.precision=fp32, set "
                                         "optim.clip_grad, or train.nonfinite=skip to skip such steps.")
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_total += 1
            self.progress_in_epoch.skipped += 1
            self.log(f"skipped: {message}")
            return None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return result

    # --- checkpoints ---------------------------------------------------------------------------------------

    def _save(self, numbered: bool) -> None:
        """Write ``last.pt`` (and ``epoch_NNNN.pt``); mid-epoch it also holds every rank's place and RNG state."""
        mid_epoch = self.progress_in_epoch.batch > 0
        partial = dist.gather_objects({"progress": asdict(self.progress_in_epoch), "rng": self._rng_states()}) \
            if mid_epoch else None
        if not self.main:
            return
        ckpt = {"format": FORMAT, "version": VERSION, "config": dump_config(self.cfg), "recipe": self.recipe,
                "epoch": self.epoch, "step": self.step, "method": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "rng": _rng_state(),
                "derived": self.d.as_dict(), "skipped_total": self.skipped_total, "partial": partial}
        if self.box_store is not None:
            ckpt["box_store"] = self.box_store.state_dict()
        folder = self.out / "checkpoints"
        atomic_save(ckpt, folder / "last.pt")
        if numbered:
            atomic_save(ckpt, folder / f"epoch_{self.epoch:04d}.pt")
            if self.cfg.train.keep_checkpoints > 0:
                for old in sorted(folder.glob("epoch_*.pt"))[:-self.cfg.train.keep_checkpoints]:
                    remove_checkpoint(old)

    # --- the run -------------------------------------------------------------------------------------------

    def _warm_start(self) -> None:
        """Steps a method needs before epoch 1 (CaCo's memory fill), at the peak rate, not counted in ``step``."""
        steps = self.method.warm_start_steps(self.d.global_batch_size)
        if not steps:
            return
        self.log(f"warm start: {steps} steps at lr {self.d.lr:.4g} before epoch 1")
        self.model.train()
        self.method.set_progress(0.0, self.cfg.train.epochs, self.per_epoch)
        done, passes = 0, 0
        while done < steps:
            seed_everything(epoch_seed(self.cfg.seed, self.rank, passes))
            batches = epoch_batches(self.targets, len(self.train_set), self.cfg, self.d, self.rank, passes)
            for views, labels, index in self._batches(batches, passes):
                if done >= steps:
                    break
                result = self._train_step(views, labels, index, self.d.lr, f"warm-start step {done}")
                self.method.after_optimizer_step(self.cfg.train.ema_momentum)
                done += 1
                if result is not None and (done % self.cfg.train.log_every == 0 or done == steps):
                    parts = ", ".join(f"{k} {float(v):.4g}" for k, v in result.parts.items())
                    self.log(f"warm start step {done}/{steps}: loss {result.loss.item():.4f}; {parts}")
            passes += 1

    def _train_epoch(self, signals: PreemptionSignals) -> float:
        """Train the rest of the current epoch; returns the wall time it took."""
        cfg, d, progress = self.cfg, self.d, self.progress_in_epoch
        seed_everything(epoch_seed(cfg.seed, self.rank, self.epoch))
        if self.resumed_mid_epoch:
            _set_rng_state(self._rng_to_restore)
            self.resumed_mid_epoch = False
        all_batches = epoch_batches(self.targets, len(self.train_set), cfg, d, self.rank, self.epoch)
        batches = all_batches[progress.batch:]
        self.model.train()
        self.progress.reset_clock(self.step)
        t0 = time.perf_counter()
        for views, labels, index in self._batches(batches, self.epoch, progress.batch):
            if self.step >= d.total_steps:
                break
            lr = self._learning_rate()
            result = self._train_step(views, labels, index, lr, f"step {self.step} (epoch {self.epoch + 1})")
            self.step += 1
            progress.batch += 1
            if result is not None:
                # The EMA after step t prepares the keys of step t + 1: per epoch, that step's epoch momentum.
                ema_step = (self.step // d.steps_per_epoch) * d.steps_per_epoch if self.per_epoch else self.step
                self.method.after_optimizer_step(ema_momentum(ema_step, base=cfg.train.ema_momentum,
                                                              total_steps=d.total_steps,
                                                              schedule=cfg.train.ema_schedule))
                if self.scores is not None:
                    self.scores.update(result.outputs, self.method.logit_temperature, self.step)
                self._pending.append((result.loss.detach(), dict(result.parts)))
                if self.step % cfg.train.log_every == 0 or self.step >= d.total_steps:
                    loss_value = self._flush_step_sums()
                    self.progress.update(self.step, self.epoch + 1, loss_value, lr)
                    if self.main and self.step % cfg.train.log_every == 0:
                        self.tb.scalars({"loss": loss_value, "lr": lr}, self.step, "train/")
            every = cfg.train.finite_check_every
            if every > 1 and (self.step % every == 0 or self.step >= d.total_steps):
                self._check_deferred_finite()
            if dist.any_rank(signals.requested, self.device):
                self._flush_step_sums()
                self._save(numbered=False)
                raise PreemptedError(
                    f"stopped by {signals.signal_name or 'a signal on another rank'} at step {self.step} "
                    f"(epoch {self.epoch + 1}, batch {progress.batch}); checkpoint {self.out / 'checkpoints' / 'last.pt'} "
                    "written. Run the same command with resume=auto to continue exactly from here.")
            every = cfg.train.checkpoint_every_steps
            if every > 0 and self.step % every == 0 and progress.batch < len(all_batches) and self.step < d.total_steps:
                self._flush_step_sums()
                self._save(numbered=False)  # mid-epoch; the epoch's end writes its own checkpoint
        self._flush_step_sums()
        self._check_deferred_finite()
        return time.perf_counter() - t0

    def _flush_step_sums(self) -> float:
        """Add the losses and loss parts kept on the device since the last flush to the epoch sums (one host read).

        Returns the newest step's loss (nan if none is pending). The sums are added step by step in float64, so
        they do not depend on when flushes happen (a resumed run sums exactly as the uninterrupted one).
        """
        if not self._pending:
            return math.nan
        progress = self.progress_in_epoch
        rows = [torch.stack([loss.double().reshape(()), *(torch.as_tensor(v, dtype=torch.float64, device=loss.device)
                                                         .reshape(()) for v in parts.values())])
                for loss, parts in self._pending]
        flat = torch.cat(rows).tolist()  # the one host read
        offset = 0
        for row, (_, parts) in zip(rows, self._pending):
            values = flat[offset:offset + row.numel()]
            offset += row.numel()
            progress.loss_sum += values[0]
            progress.loss_count += 1
            for key, value in zip(parts, values[1:]):
                progress.part_sums[key] = progress.part_sums.get(key, 0.0) + value
        self._pending.clear()
        return values[0]

    def _check_deferred_finite(self) -> None:
        """``train.finite_check_every > 1``: stop if a step since the last check had a non-finite loss or gradient."""
        if self._nonfinite_pending is None:
            return
        bad = dist.any_rank(bool(self._nonfinite_pending.item()), self.device)
        first = self._unchecked_since + 1
        self._nonfinite_pending, self._unchecked_since = None, self.step
        if bad:
            raise NonFiniteLossError(
                f"a loss or gradient became non-finite between step {first} and step {self.step} (checked every "
                f"{self.cfg.train.finite_check_every} steps, train.finite_check_every); the weights are no longer "
                "usable, the last checkpoint is. Lower optim.lr, use train.precision=fp32, set optim.clip_grad, or "
                "train.finite_check_every=1 with train.nonfinite=skip to skip such steps.")

    def _end_epoch(self, elapsed: float) -> None:
        cfg, mon, progress = self.cfg, self.cfg.monitor, self.progress_in_epoch
        count = max(1, progress.loss_count)
        record: dict[str, Any] = {
            "epoch": self.epoch, "step": self.step,
            "loss": dist.all_reduce_mean(torch.tensor(progress.loss_sum / count)).item(),
            "lr": self.optimizer.param_groups[0]["lr"],
            "img_per_s": progress.batch * self.d.global_batch_size / elapsed if elapsed > 0 else 0.0,
        }
        if progress.part_sums:
            record["parts"] = {k: dist.all_reduce_mean(torch.tensor(v / count)).item()
                               for k, v in progress.part_sums.items()}
        if self.skipped_total:
            record["skipped_steps"] = progress.skipped
        if self.bad_image_log.is_file():
            record["bad_images_total"] = sum(1 for _ in self.bad_image_log.open(encoding="utf-8"))
        last_epoch = self.step >= self.d.total_steps
        collapsed = False
        if self.knn is not None and (last_epoch or (mon.knn_every > 0 and self.epoch % mon.knn_every == 0)
                                     or self.epoch <= mon.knn_every_epoch_until):
            self.knn_top1 = self.knn.evaluate(self.method.backbone)
            record["knn_top1"] = self.knn_top1
            self.log(f"epoch {self.epoch}: kNN top-1 {self.knn_top1:.2f}% ({self.knn.label()})")
            collapsed = (mon.collapse_threshold > 0 and self.epoch >= mon.collapse_after_epoch
                         and self.knn_top1 <= mon.collapse_threshold)
        if self.classifier_monitor is not None and (
                last_epoch or (mon.classify_every > 0 and self.epoch % mon.classify_every == 0)):
            record["test_top1"] = self.classifier_monitor.evaluate(self.method)
            self.log(f"epoch {self.epoch}: test top-1 "
                     + ", ".join(f"{k} {v:.2f}%" for k, v in record["test_top1"].items()))
        if self.scores is not None:
            self.scores.end_epoch(self.epoch)
        if self._localise_now():
            record["box_mean_area"] = self._localise()
        self.progress_in_epoch = EpochProgress()
        self._pending: list[tuple[torch.Tensor, dict[str, Any]]] = []  # step losses not yet read to the host
        self._nonfinite_pending: torch.Tensor | None = None  # train.finite_check_every > 1
        self._unchecked_since = 0
        dist.barrier()
        if self.main:
            self.metrics.write(record)
            self.tb.scalars({k: v for k, v in record.items() if not isinstance(v, dict)}, self.epoch, "epoch/")
            self.tb.scalars(record.get("parts", {}), self.epoch, "parts/")
            self.tb.scalars(record.get("test_top1", {}), self.epoch, "test_top1/")
        self._save(numbered=cfg.train.checkpoint_every > 0 and self.epoch % cfg.train.checkpoint_every == 0)
        dist.barrier()
        if dist.any_rank(collapsed, self.device):
            raise CollapseError(
                f"kNN top-1 is at or below monitor.collapse_threshold={mon.collapse_threshold}% at epoch "
                f"{self.epoch} (collapse guard from epoch {mon.collapse_after_epoch}): the representation has "
                f"collapsed, so the run stops (checkpoint {self.out / 'checkpoints' / 'last.pt'} kept). Lower "
                "optim.lr or the method's memory/queue learning rate, or set monitor.collapse_threshold=0.")

    def _localise_now(self) -> bool:
        """ContrastiveCrop's schedule: after the warm-up epochs, then every ``box_update_every``, not after the last."""
        loc = self.localisation
        if loc is None or self.epoch < loc.warmup_epochs or self.step >= self.d.total_steps:
            return False
        return (self.epoch - loc.warmup_epochs) % max(1, loc.every) == 0

    def _localise(self) -> float:
        """Refresh every image's box from the online backbone's heatmap (all ranks); returns the mean box area."""
        loc = self.localisation
        mean, std = assemble.normalization(self.cfg)
        images = eval_view_dataset(self.base_train, assemble.image_size(self.cfg), mean, std, crop_fraction=None)
        batch = max(64, self.d.per_rank_batch_size)
        if self.device_views is not None:  # this rank's share, rendered on the device (from the store if held)
            shard = Subset(images, range(self.rank, len(images), self.world))
            store = getattr(self.device_views, "store", None)
            images = DeviceEvalLoader(shard, self.device, batch, store, workers=self.cfg.data.workers)
        boxes = localise(last_feature_map(self.method.backbone), images, loc.threshold, self.device,
                         kind=loc.heatmap, num_samples=len(self.base_train),
                         batch_size=batch, num_workers=self.cfg.data.workers, edges=loc.edges)
        self.box_store.fill(boxes)
        self.box_store.set_enabled(True)
        area = self.box_store.mean_area()
        self.log(f"epoch {self.epoch}: localised {len(boxes)} boxes (threshold {loc.threshold}, {loc.heatmap}); "
                 f"mean box area {area:.3f} of the image")
        return area

    def _finish(self) -> dict[str, Any]:
        results: dict[str, Any] = {"recipe": self.recipe, "out": str(self.out), "epochs": self.epoch,
                                   "steps": self.step}
        if self.main:
            history = self.metrics.read()
            if history:
                results["final_loss"] = history[-1]["loss"]
            if self.knn is not None:
                if self.knn_top1 is None:
                    self.knn_top1 = self.knn.evaluate(self.method.backbone)
                results["knn_top1"] = self.knn_top1
                results.update(self.knn.describe())
            if self.classifier_monitor is not None and history and "test_top1" in history[-1]:
                results["test_top1"] = history[-1]["test_top1"]  # the final epoch's, never a selected epoch
                results.update(self.classifier_monitor.describe())
            if self.skipped_total:
                results["skipped_steps"] = self.skipped_total
            if self.cfg.monitor.plots and history:
                from contrastlab.viz.curves import plot_training_curves

                plot_training_curves(history, self.out / "plots")
            (self.out / "results.json").write_text(json.dumps(results, indent=2))
        self.tb.close()
        dist.barrier()
        if math.isnan(results.get("final_loss", 0.0)):
            raise NonFiniteLossError("final loss is NaN")
        return results

    def run(self) -> dict[str, Any]:
        """Train to the end (or ``train.max_steps``) and return the final results."""
        d = self.d
        self.log(f"training {self.recipe}: {len(self.train_set)} images, global batch {d.global_batch_size} on "
                 f"{self.world} rank(s), lr {d.lr:.4g}, {d.total_steps} steps, device {self.device}, out {self.out}")
        try:
            with PreemptionSignals() as signals:
                self._warm_start()
                while self.step < d.total_steps:
                    elapsed = self._train_epoch(signals)
                    self.epoch += 1
                    self._end_epoch(elapsed)
            return self._finish()
        finally:
            self.close()

    def close(self) -> None:
        """Release the run directory (called by :meth:`run` however it ends; idempotent)."""
        if self.run_lock is not None:
            self.run_lock.release()


def train(cfg: Config, recipe: str = "run", *, quiet: bool = False) -> dict[str, Any]:
    """Train ``cfg`` to the end (or ``train.max_steps``) and return the final results (:class:`Trainer`).

    The process-wide switch a run may set (``train.deterministic``) is restored when it returns or fails, so a
    notebook or a test session that trains several runs does not inherit it.
    """
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        return Trainer(cfg, recipe, quiet=quiet).run()
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
