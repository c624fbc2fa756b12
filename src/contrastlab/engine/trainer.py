"""The training loop: :func:`train`, from a config (and, if given, ready objects) to a finished run directory.

:class:`Trainer` is one run: set-up (datasets, method, DDP, optimiser, observers, resume), an optional warm
start (``method.warm_start_steps``), then epochs of steps. It knows no plug-in by name: what watches a run
(monitors, loggers, the crop laws' helpers) are observers (:mod:`contrastlab.observers`) that it builds from the
config lists ``observers`` and ``log.to`` and calls at fixed points; the run directory is described in
:mod:`contrastlab.engine.run_directory`, and one trainer at a time holds it (:mod:`contrastlab.engine.run_lock`).

Determinism and resuming: an epoch's batches are a pure function of ``(seed, rank, epoch)``
(:func:`~contrastlab.engine.epoch_batches.epoch_batches`), each image's views of ``(seed, epoch, index)``, and
the global RNGs are re-seeded at every epoch start. A checkpoint written in the middle of an epoch (by
``train.checkpoint_every_steps`` or a preemption signal) also holds every rank's RNG state, position in the
epoch, partial epoch sums and the observers' state, so a resumed run continues the same sequence of batches,
views and losses as the uninterrupted one (bit for bit on the CPU with ``train.deterministic``).

Faults: SIGTERM / SIGUSR1 checkpoint at the next step boundary and stop with exit status 75
(:mod:`contrastlab.engine.preemption`); under ``torchrun --max-restarts`` a restarted job resumes from its
last checkpoint by itself; a non-finite loss or gradient stops the run with a message, or skips the step
(``train.nonfinite=skip``, counted as ``skipped_steps`` in the epoch's record).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from contrastlab import assemble
from contrastlab.config.derived import derive
from contrastlab.config.load import changed_keys, config_from_dict, config_to_dict, dump_config
from contrastlab.config.schema import Config
from contrastlab.engine import distributed as dist
from contrastlab.engine.checkpoint import FORMAT, VERSION, atomic_save, load_checkpoint, remove_checkpoint
from contrastlab.engine.device import (
    PRECISIONS,
    check_view_memory,
    compile_model,
    out_of_memory,
    select_device,
    step_load,
)
from contrastlab.engine.epoch_batches import epoch_batches
from contrastlab.engine.epoch_sums import EpochProgress
from contrastlab.engine.finite_check import DeferredFiniteCheck, NonFiniteLossError, finite_flag
from contrastlab.engine.gradients import clip_gradients
from contrastlab.engine.inputs import InputPipeline, set_bad_images, test_dataset, training_inputs
from contrastlab.engine.optim import build_optimizer, mark_groups, set_learning_rate, set_weight_decay
from contrastlab.engine.preemption import PreemptedError, PreemptionSignals
from contrastlab.engine.run_directory import (
    check_fresh_start,
    clear_for_fresh_start,
    resolve_resume,
    run_directory,
    write_run_files,
)
from contrastlab.engine.run_lock import lock_run_directory
from contrastlab.engine.schedules import ema_momentum, run_learning_rate, run_weight_decay
from contrastlab.engine.seeding import epoch_seed, rng_state, seed_everything, set_rng_state
from contrastlab.errors import CheckpointError, ConfigError, ContrastlabError
from contrastlab.methods.base import Method, StepOutput, check_step_output
from contrastlab.observers.base import Observer, ObserverList, Run
from contrastlab.observers.loggers.base import Logger
from contrastlab.registry import LOGGERS, OBSERVERS

__all__ = ["NonFiniteLossError", "Trainer", "select_device", "train"]


class Trainer:
    """One training run: built from a config and, optionally, ready objects; then :meth:`run`.

    Works in a single process and under ``torchrun`` (one process per device; ``data.batch_size`` is the
    global batch, split over ranks; the learning rate is scaled from the global batch).

    Args:
        cfg: The run's config (default: :class:`~contrastlab.config.schema.Config` defaults). It supplies
            whatever is not given as an object: optimiser, schedules, run directory, monitors' settings, ...
        recipe: The recipe name (run directory ``runs/<recipe>`` when ``cfg.out`` is empty; results.json).
        method: A :class:`~contrastlab.methods.base.Method` to train instead of ``method``/``model`` of the config.
        dataset: The training dataset: raw ``(PIL image, label, index)`` items, or a ready
            :class:`~contrastlab.views.ViewDataset`. The monitors need its ``classes`` and ``targets``.
        planner: A planner (crop law) object for the training views of ``dataset`` (or of the config's dataset).
        test_dataset: The raw test dataset of the monitors (default: ``data.test_split``).
        observers: :class:`~contrastlab.observers.base.Observer` instances to call besides those the config lists
            (a :class:`~contrastlab.observers.loggers.base.Logger` among them is called on rank 0 only).
        quiet: No console output.
        trust_pickle: Resume from a checkpoint holding Python objects besides tensors and plain containers (written
            by another program, or altered): it may run code from the file, so only for a file you trust.

    Example:
        >>> from contrastlab import Trainer, load_config  # doctest: +SKIP
        >>> results = Trainer(load_config("demo", ["train.max_steps=4"]), method=my_method).run()  # doctest: +SKIP
        >>> results["steps"]  # doctest: +SKIP
        4
    """

    def __init__(self, cfg: Config | None = None, recipe: str = "run", *, method: Method | None = None,
                 dataset: Dataset | None = None, planner: Any = None, test_dataset: Dataset | None = None,
                 observers: Iterable[Observer] = (), quiet: bool = False, trust_pickle: bool = False) -> None:
        cfg = Config() if cfg is None else cfg
        self.cfg, self.recipe, self.quiet, self.trust_pickle = cfg, recipe, quiet, trust_pickle
        denv = dist.init_distributed(select_device(cfg.train.device).type)
        self.rank, self.world = denv.rank, denv.world_size
        self.device = select_device(cfg.train.device, denv.local_rank)
        self.main = self.rank == 0
        config_from_dict(config_to_dict(cfg))  # a config built in Python gets the checks of a loaded one
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)

        self.out = run_directory(cfg, recipe)
        # One trainer per run directory: rank 0 holds <out>/run.lock until close() (engine.run_lock).
        self.run_lock = lock_run_directory(self.out, cfg.train.lock_timeout, self.log, self.main,
                                           lambda flag: dist.any_rank(flag, self.device), " ".join(sys.argv)[:300])
        try:
            self._build(method, dataset, planner, test_dataset, list(observers))
        except BaseException:
            self.close()
            raise

    def _build(self, method: Method | None, dataset: Dataset | None, planner: Any, test_dataset: Dataset | None,
               observers: list[Observer]) -> None:
        """The rest of set-up, with the run directory locked."""
        self.started = time.perf_counter()  # wall time counts from here (set-up included)
        self.wall_before = 0.0  # wall seconds of the processes this run resumed from
        cfg = self.cfg
        resume_path = resolve_resume(cfg, self.out, self.log, self.device, self.trust_pickle)
        if resume_path is None:  # a fresh run starts in an empty directory: nothing of an earlier one mixes in
            refused = None
            try:
                check_fresh_start(cfg, self.out)
            except ConfigError as exc:
                refused = exc
            if dist.any_rank(refused is not None, self.device):  # every rank stops, or none
                raise refused or ConfigError(f"another rank refused run directory {self.out} (see its message)")
            if self.main:
                clear_for_fresh_start(self.out, self.log)
            dist.barrier()
        seed_everything(cfg.seed + self.rank)
        self.bad_image_log = self.out / "bad_images.txt"
        self.base_train, self.train_set = training_inputs(cfg, dataset, planner)
        set_bad_images(self.base_train, cfg, self.bad_image_log)
        self.targets = getattr(self.base_train, "targets", None)
        self.d = d = derive(cfg, self.world, len(self.train_set))
        refused = None
        try:  # each rank's own device; every rank stops, or none
            check_view_memory(cfg, self.train_set.sizes, d.per_rank_batch_size, self.device)
        except ConfigError as exc:
            refused = exc
        if dist.any_rank(refused is not None, self.device):
            raise refused or ConfigError("another rank has too little memory for data.image_size (see its message)")
        self.inputs = InputPipeline(cfg, self.train_set, self.device, self.rank, self.log)
        self.device_views, self.input_pipeline = self.inputs.device_views, self.inputs.name
        self.num_classes = len(getattr(self.base_train, "classes", [])) or 1
        self.given = {k: f"{type(v).__module__}.{type(v).__qualname__}" for k, v in (
            ("method", method), ("dataset", dataset), ("planner", planner), ("test_dataset", test_dataset)) if v is not None}
        self.given_test = test_dataset

        self.model = self.method = self._build_method(method)
        self._check_batch_size()
        if self.world > 1:
            if cfg.model.sync_bn:
                self.method = nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
            self.model = dist.wrap_ddp(self.method, self.device)
        if cfg.train.compile != "none":  # the step's forward compiled; checkpoints keep reading self.method
            self.model = compile_model(self.model, cfg.train.compile)
        self.optimizer = build_optimizer(self.method.param_groups(), cfg.optim, d.lr)
        self.amp_dtype = PRECISIONS[cfg.train.precision]
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=cfg.train.precision == "fp16" and self.device.type == "cuda")
        self.per_epoch = cfg.train.schedule_unit == "epoch"
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format

        self.epoch, self.step, self.skipped_total = 0, 0, 0
        self.numbered: list[str] = []  # the epoch_NNNN.pt files this run wrote and keeps (train.keep_checkpoints)
        self.progress_in_epoch = EpochProgress()
        self.deferred_check = DeferredFiniteCheck(cfg.train.finite_check_every)
        self.resumed_mid_epoch = False
        self.output_checked = False  # the method's first step output is checked once (check_step_output)
        self.last_step_loss: torch.Tensor | None = None  # on the device: read once, at the end
        self.last_record: dict[str, Any] | None = None  # the newest epoch's metrics
        self.run_view = Run(self)
        self.observers = self._build_observers(observers)
        if resume_path is not None:
            self._load(resume_path)
        dist.broadcast_ignored_buffers(self.method)  # every rank starts from rank 0's queue / memory
        if self.main:
            write_run_files(self.out, cfg, self.recipe, {
                "derived": d.as_dict(), "input_pipeline": self.input_pipeline,
                "views_compiled": self.device_views is not None and cfg.data.compile_views,
                **({"objects": self.given} if self.given else {})}, self.device)

    # --- set-up --------------------------------------------------------------------------------------------

    def log(self, *args: object) -> None:
        if self.main and not self.quiet:
            print(*args, file=sys.stderr, flush=True)

    def _build_method(self, given: Method | None) -> Method:
        """The given method, or the config's; on the device, identical initial weights on every rank."""
        cfg = self.cfg
        if given is not None and not isinstance(given, Method):
            raise ConfigError(f"method must be a contrastlab Method (a subclass of contrastlab.Method), got "
                              f"{type(given).__name__}")
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        try:
            method = given if given is not None else assemble.method(cfg, self.num_classes, self.targets)
            method = method.to(self.device)
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError (CUDA) is a RuntimeError
            if not out_of_memory(exc):
                raise
            raise ConfigError(f"building the model ran out of memory on {self.device} ({str(exc).splitlines()[0]}); "
                              f"model.arch={cfg.model.arch}, model.width={cfg.model.width}, "
                              f"model.peers={cfg.model.peers}, method.name={cfg.method.name}: choose a smaller model "
                              "or method setting (a queue or memory size)") from exc
        return method.to(memory_format=torch.channels_last) if cfg.model.channels_last else method

    def _check_batch_size(self) -> None:
        """ConfigError when a rank's batch is smaller than the method needs (:meth:`Method.batch_size_needed`)."""
        need, why = self.method.batch_size_needed()
        per_rank, world = self.d.per_rank_batch_size, self.world
        if per_rank < need:
            raise ConfigError(f"data.batch_size={self.cfg.data.batch_size} gives {per_rank} image(s) per rank on "
                              f"{world} rank(s), but method {self.method.name!r} needs at least {need} per rank: "
                              f"{why}. Set data.batch_size={need * world} or more")

    def _build_observers(self, given: list[Observer]) -> ObserverList:
        """The config's observers, the given ones, then the loggers (on rank 0 only: only rank 0 logs)."""
        run = self.run_view
        named = ObserverList.build(run, self.cfg.observers, OBSERVERS)
        loggers = ObserverList.build(run, self.cfg.log.to, LOGGERS)  # built everywhere: a missing package fails alike
        mine = [(getattr(o, "name", "") or type(o).__name__, o) for o in given]
        named += [(n, o) for n, o in mine if not isinstance(o, Logger)]
        if self.main:
            named += loggers + [(n, o) for n, o in mine if isinstance(o, Logger)]
        return ObserverList(named)

    def load_test_dataset(self) -> Dataset:
        """The monitors' raw test dataset: the one given, else ``data.test_split`` (see :attr:`Run.test_dataset`)."""
        return self.given_test if self.given_test is not None else test_dataset(self.cfg, self.bad_image_log)

    def _load(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location=self.device, trust_pickle=self.trust_pickle)
        self._check_same_objects(ckpt, path)
        self._load_states(path, ckpt)
        if ckpt["scaler"]:  # an imported checkpoint (contrastlab import) has no loss-scaler state
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        if self.step is None:  # imported: upstream counts epochs only
            self.step = self.epoch * self.d.steps_per_epoch
        self.skipped_total = ckpt.get("skipped_total", 0)
        self.wall_before = float(ckpt.get("wall_seconds", 0.0))
        self._load_rank_local(ckpt.get("rank_local"), path)
        self.numbered = list(ckpt.get("numbered", []))  # older checkpoints: none counted, none deleted
        self.last_record = ckpt.get("record")
        self.observers.load_state_dict(ckpt.get("observers", {}), rank_local=False, log=self.log)
        partial = ckpt.get("partial")
        if partial is not None:  # written mid-epoch: this rank's place, sums, random state and observers' state
            if len(partial) != self.world:
                raise ContrastlabError(f"{path} was written mid-epoch by {len(partial)} rank(s); resume it with "
                                       f"{len(partial)} rank(s), or from an end-of-epoch checkpoint (epoch_NNNN.pt)")
            mine = partial[self.rank]
            self.progress_in_epoch = EpochProgress(**mine["progress"])
            self._rng_to_restore = mine["rng"]
            self.resumed_mid_epoch = True
            self.method.set_random_state(mine["rng"])
            self.observers.load_state_dict(mine.get("observers", {}), rank_local=True, log=self.log)
        where = f", batch {self.progress_in_epoch.batch} of epoch {self.epoch + 1}" if partial else ""
        self.log(f"resumed from {path} at epoch {self.epoch}, step {self.step}{where}")

    def _load_rank_local(self, saved: list[dict[str, torch.Tensor]] | None, path: Path) -> None:
        """This rank's own copy of the method's rank-local buffers (:meth:`Method.rank_local_buffers`)."""
        if not saved:
            return
        if len(saved) != self.world:
            raise ContrastlabError(f"{path} holds the rank-local state of {len(saved)} rank(s) "
                                   f"({', '.join(sorted(saved[0]))}); resume it with {len(saved)} rank(s)")
        buffers = dict(self.method.named_buffers())
        for name, value in saved[self.rank].items():
            buffers[name].copy_(value.to(buffers[name].device))

    def _check_same_objects(self, ckpt: dict[str, Any], path: Path) -> None:
        """ContrastlabError when the checkpoint was trained with another method class than this run builds, or with
        objects given in Python that this run was not given (its config alone cannot rebuild them)."""
        trained = ckpt.get("method_class")
        mine = type(self.method).__qualname__
        given = ckpt.get("given") or {}
        missing = sorted(set(given) - set(self.given))
        if missing:
            objects = ", ".join(f"{k}={given[k]}(...)" for k in missing)
            raise ContrastlabError(f"{path} was trained with objects given in Python ({objects}), which its config "
                                   f"cannot rebuild; resume it from Python with the same objects, e.g. "
                                   f"contrastlab.train(cfg, {', '.join(f'{k}=...' for k in missing)}), with resume=auto")
        if trained is not None and not trained.endswith(f".{mine}"):  # the module may be named otherwise: a plug-in file
            raise ContrastlabError(f"{path} was trained with method {trained}, but this run builds {type(self.method).__module__}."
                                   f"{mine} (method.name={self.cfg.method.name}); resume with the same method (its "
                                   "saved config.yaml has it), or start afresh with overwrite=true or another out=DIR")

    def _load_states(self, path: Path, ckpt: dict[str, Any]) -> None:
        """Load the method's and the optimiser's state; CheckpointError naming the config keys that differ from the
        checkpoint's when they do not fit this run (another model, method head or optimiser)."""
        changed = changed_keys(ckpt.get("config"), self.cfg, ("model.", "method.", "optim."))
        try:
            self.method.load_state_dict(ckpt["method"])
            if any(key == "optim.name" for key, _, _ in changed):  # it could load, then fail at the first step
                raise ValueError("its optimizer state belongs to another optimizer")
            self.optimizer.load_state_dict(ckpt["optimizer"])
            mark_groups(self.optimizer, self.cfg.optim)
        except (RuntimeError, KeyError, ValueError) as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
            cause = " ".join(lines[:2]) + (f" ... and {len(lines) - 2} more" if len(lines) > 2 else "")
            differ = ("the checkpoint's config differs from this run's in " + ", ".join(
                f"{key} ({before} in the checkpoint, {now} now)" for key, before, now in changed) if changed else
                "its saved config shows no difference in the model.*, method.* or optim.* keys (written by other code?)")
            raise CheckpointError(f"resume: {path} does not fit this run ({cause}); {differ}. Resuming needs the "
                                  "model, method and optimizer the checkpoint was written with: set those keys back, "
                                  "or start afresh with overwrite=true (the run directory's files are deleted) or "
                                  "another out=DIR") from exc

    # --- one step ------------------------------------------------------------------------------------------

    def _learning_rate(self) -> float:
        """The scheduled rate of this step; the method is told where training stands (its own schedules)."""
        position = float(self.epoch) if self.per_epoch else self.step / self.d.steps_per_epoch
        self.method.set_progress(position, self.cfg.train.epochs, self.per_epoch)
        return run_learning_rate(self.cfg, self.d, self.epoch, self.step)

    def _train_step(self, views, labels, index, lr: float, where: str) -> StepOutput | None:
        """Forward, backward and optimiser step on one batch; ``None`` when the step was skipped.

        With ``train.finite_check_every == 1`` the step reads whether its loss and gradients are finite (agreed
        across ranks) and stops or skips; with ``> 1`` it reads nothing to the host and the flag is checked later.
        """
        cfg = self.cfg
        set_learning_rate(self.optimizer, lr, self.d.lr)
        if cfg.optim.weight_decay_end is not None:
            set_weight_decay(self.optimizer, run_weight_decay(cfg, self.d, self.step))
        views = [v.to(self.device, non_blocking=True, memory_format=self.memory_format) for v in views]
        labels, index = labels.to(self.device), index.to(self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext():
            result = self.model(views, labels, index)
        if not self.output_checked:
            check_step_output(self.method, result)
            self.output_checked = True
        loss = result.loss
        self.optimizer.zero_grad(set_to_none=True)
        check_now = cfg.train.finite_check_every == 1
        loss_ok = bool(torch.isfinite(loss.detach())) if check_now else True  # no backward of a bad loss
        if loss_ok:
            self.scaler.scale(loss).backward()
            if cfg.optim.clip_grad > 0:
                self.scaler.unscale_(self.optimizer)
                clip_gradients(self.method.parameters(), cfg.optim.clip_grad, cfg.optim.clip_grad_mode)
            self.method.before_optimizer_step(self.step)
        # gradients are not checked under fp16, whose scaler skips bad steps itself
        finite = finite_flag(loss, self.method.parameters(), check_gradients=not self.scaler.is_enabled())
        if not check_now:
            self.deferred_check.add(finite)
        elif dist.any_rank(not (loss_ok and bool(finite)), self.device):
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
        partial = None
        if self.progress_in_epoch.batch > 0:  # mid-epoch
            partial = dist.gather_objects({"progress": self.progress_in_epoch.saved(),
                                           "rng": {**rng_state(), **self.method.random_state()},
                                           "observers": self.observers.state_dict(rank_local=True)})
        own = self.method.rank_local_buffers()
        rank_local = None
        if own:  # every rank's own copy (collective): each rank gets its own back on resume
            buffers = dict(self.method.named_buffers())
            rank_local = dist.gather_objects({name: buffers[name].detach().cpu() for name in own})
        if not self.main:
            return
        written = self.numbered + ([f"epoch_{self.epoch:04d}.pt"] if numbered else [])
        keep = self.cfg.train.keep_checkpoints
        kept = written[-keep:] if keep > 0 else written  # retention counts only this run's own files
        ckpt = {"format": FORMAT, "version": VERSION, "config": dump_config(self.cfg), "recipe": self.recipe,
                "epoch": self.epoch, "step": self.step, "method": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng_state(),
                "derived": self.d.as_dict(), "skipped_total": self.skipped_total, "partial": partial,
                "wall_seconds": self.wall_seconds(),
                "numbered": kept, "given": self.given, "rank_local": rank_local,
                "method_class": f"{type(self.method).__module__}.{type(self.method).__qualname__}",
                "observers": self.observers.state_dict(rank_local=False), "record": self.last_record}
        folder = self.out / "checkpoints"
        atomic_save(ckpt, folder / "last.pt")
        if numbered:
            atomic_save(ckpt, folder / f"epoch_{self.epoch:04d}.pt")
            for old in written[:len(written) - len(kept)]:
                remove_checkpoint(folder / old)
            self.numbered = kept

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
            for views, labels, index in self.inputs(batches, passes):
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
        cfg, d, progress, run = self.cfg, self.d, self.progress_in_epoch, self.run_view
        seed_everything(epoch_seed(cfg.seed, self.rank, self.epoch))
        if self.resumed_mid_epoch:
            set_rng_state(self._rng_to_restore)
            self.resumed_mid_epoch = False
        all_batches = epoch_batches(self.targets, len(self.train_set), cfg, d, self.rank, self.epoch)
        self.model.train()
        self.observers.on_epoch_start(run)
        t0 = time.perf_counter()
        for views, labels, index in self.inputs(all_batches[progress.batch:], self.epoch, progress.batch):
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
                progress.add(result.loss, result.parts)
                self.last_step_loss = result.loss.detach()
                self.observers.on_step_end(run, dataclasses.replace(result, loss=self.last_step_loss))
                if self.step % cfg.train.log_every == 0 or self.step >= d.total_steps:
                    run.log_metrics({"train/loss": progress.flush(), "train/lr": lr})
            every = cfg.train.finite_check_every
            if every > 1 and (self.step % every == 0 or self.step >= d.total_steps):
                self.deferred_check.check(self.step, self.device)
            if dist.any_rank(signals.requested, self.device):
                progress.flush()
                self._save(numbered=False)
                raise PreemptedError(
                    f"stopped by {signals.signal_name or 'a signal on another rank'} at step {self.step} "
                    f"(epoch {self.epoch + 1}, batch {progress.batch}); checkpoint {self.out / 'checkpoints' / 'last.pt'} "
                    "written. Run the same command with resume=auto to continue exactly from here.")
            every = cfg.train.checkpoint_every_steps
            if every > 0 and self.step % every == 0 and progress.batch < len(all_batches) and self.step < d.total_steps:
                progress.flush()
                self._save(numbered=False)  # mid-epoch; the epoch's end writes its own checkpoint
        progress.flush()
        self.deferred_check.check(self.step, self.device)
        return time.perf_counter() - t0

    def _end_epoch(self, elapsed: float) -> None:
        """The epoch's record (observers add to it and log it), the checkpoint, and a stop an observer asked for."""
        progress, run = self.progress_in_epoch, self.run_view
        means = progress.means()
        record: dict[str, Any] = {
            "epoch": self.epoch, "step": self.step, "loss": means["loss"], "lr": self.optimizer.param_groups[0]["lr"],
            "img_per_s": progress.batch * self.d.global_batch_size / elapsed if elapsed > 0 else 0.0,
            "wall_seconds": self.wall_seconds(),  # since the run started, before this epoch's monitors
        }
        if "parts" in means:
            record["parts"] = means["parts"]
        if self.skipped_total:
            record["skipped_steps"] = progress.skipped
        if self.bad_image_log.is_file():
            record["bad_images_total"] = sum(1 for _ in self.bad_image_log.open(encoding="utf-8"))
        self.progress_in_epoch = EpochProgress()
        self.deferred_check.reset(self.step)
        self.observers.on_epoch_end(run, record)
        self.last_record = record
        dist.barrier()
        self._save(numbered=self.cfg.train.checkpoint_every > 0 and self.epoch % self.cfg.train.checkpoint_every == 0)
        dist.barrier()
        if dist.any_rank(run.stop_requested is not None, self.device):
            raise next(e for e in dist.gather_objects(run.stop_requested) if e is not None)

    def _finish(self) -> dict[str, Any]:
        results: dict[str, Any] = {"recipe": self.recipe, "out": str(self.out), "epochs": self.epoch,
                                   "steps": self.step}
        if self.last_record is not None:  # both said: the mean is smoother, the last step is where training ended
            results["final_loss"] = self.last_record["loss"]
            results["final_loss_is"] = "the mean loss of the last epoch's steps (over ranks); last_step_loss: its last step's"
        if self.last_step_loss is not None:
            results["last_step_loss"] = float(dist.all_reduce_mean(self.last_step_loss.float()))
        if self.skipped_total:
            results["skipped_steps"] = self.skipped_total
        self.observers.on_finish(self.run_view, results)
        results["wall_seconds"] = self.wall_seconds()
        results["wall_seconds_is"] = ("seconds from the trainer's start to the end of training, summed over the "
                                      "processes of a resumed run (set-up, monitors and checkpoints included)")
        if self.main:
            (self.out / "results.json").write_text(json.dumps(results, indent=2))
        dist.barrier()
        if math.isnan(results.get("final_loss", 0.0)):
            raise NonFiniteLossError("final loss is NaN")
        return results

    def run(self) -> dict[str, Any]:
        """Train to the end (or ``train.max_steps``) and return the final results."""
        d = self.d
        for note in self.cfg.notes:
            self.log(f"config: {note}")
        self.log(f"training {self.recipe}: {len(self.train_set)} images, global batch {d.global_batch_size} on "
                 f"{self.world} rank(s), lr {d.lr:.4g}, {d.total_steps} steps, device {self.device}, out {self.out}")
        try:
            self.observers.on_start(self.run_view)
            with PreemptionSignals() as signals:
                try:
                    self._warm_start()
                    while self.step < d.total_steps:
                        elapsed = self._train_epoch(signals)
                        self.epoch += 1
                        self._end_epoch(elapsed)
                except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError (CUDA) is a RuntimeError
                    if not out_of_memory(exc):
                        raise
                    raise ConfigError(f"training ran out of memory on {self.device} "
                                      f"({str(exc).strip().splitlines()[0] if str(exc).strip() else 'MemoryError'}) "
                                      f"at step {self.step}: {step_load(self.cfg, self.train_set.sizes, d)}") from exc
            return self._finish()
        finally:
            self.close()

    def wall_seconds(self) -> float:
        """Seconds since this run started, summed over the processes it resumed from (checkpoints carry the sum)."""
        return self.wall_before + time.perf_counter() - self.started

    def close(self) -> None:
        """Release the run directory (called by :meth:`run` however it ends; idempotent)."""
        if self.run_lock is not None:
            self.run_lock.release()


def train(cfg: Config | None = None, recipe: str = "run", *, quiet: bool = False, trust_pickle: bool = False,
          **objects: Any) -> dict[str, Any]:
    """Train to the end (or ``train.max_steps``) and return the final results (:class:`Trainer`).

    ``objects`` are the ready objects :class:`Trainer` accepts (``method``, ``dataset``, ``planner``,
    ``test_dataset``, ``observers``); ``trust_pickle`` as for :class:`Trainer`. The process-wide switch a run may set (``train.deterministic``) is restored
    when it returns or fails, so a notebook or a test session that trains several runs does not inherit it.
    """
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        return Trainer(cfg, recipe, quiet=quiet, trust_pickle=trust_pickle, **objects).run()
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
