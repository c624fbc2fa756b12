"""End-to-end fine-tuning: a pre-trained backbone and a new linear head trained together on labelled images.

The protocol is DeiT's (Touvron et al., "Training data-efficient image transformers & distillation through
attention", ICML 2021; facebookresearch/deit ``main.py``), which MoCo v3 (Chen, Xie, He, ICCV 2021) used to
fine-tune its ViTs "with all the default DeiT configs" (moco-v3 README): AdamW with weight decay on the
matrices only, linear warm-up then cosine, RandAugment, random erasing, repeated augmentation, mixup/cutmix
with label smoothing, stochastic depth, and an EMA of the weights. The augmentations, losses, EMA and the
repeated-augmentation sampler are timm's own (``create_transform``, ``Mixup``, ``SoftTargetCrossEntropy`` /
``LabelSmoothingCrossEntropy``, ``ModelEmaV2``, ``RepeatAugSampler``); the optimiser, schedules, checkpoint
writing and the classifier evaluation are contrastlab's (:mod:`contrastlab.engine.optim`,
:mod:`contrastlab.engine.schedules`, :mod:`contrastlab.engine.checkpoint`,
:class:`~contrastlab.observers.classification_monitor.ClassificationMonitor`).

Every parameter trains, the head, the position embedding and the patch projection included (MoCo v3 keeps the
last two fixed during pre-training; DeiT's model, into which the converted checkpoint is loaded, trains them).
Weight decay skips 1-D parameters, biases, ``pos_embed`` and ``cls_token`` (timm's ``create_optimizer`` with
the model's ``no_weight_decay()``). No layer-wise learning-rate decay: DeiT has none.

Learning-rate schedule (:func:`finetune_learning_rate`):

- ``schedule="cosine"`` (default): per step, linear from ``warmup_lr`` to the peak over ``warmup_epochs``,
  then a half cosine to ``min_lr`` at the last step (:func:`contrastlab.engine.schedules.learning_rate`);
- ``schedule="deit"`` (the release): timm's ``CosineLRScheduler`` (``t_initial = epochs``, no warm-up prefix)
  stepped once per epoch as DeiT's loop does, after the epoch with that epoch's index, so epoch ``e`` trains at
  ``f(max(e - 1, 0))`` with ``f(t) = warmup_lr + t (lr - warmup_lr) / W`` for ``t < W`` and
  ``min_lr + (lr - min_lr) (1 + cos(pi t / epochs)) / 2`` after: the first two epochs both run at
  ``warmup_lr`` and the cosine never reaches ``min_lr``.

The reported accuracy is the model's top-1 after the final epoch on one centre view per test image (DeiT
prints the maximum over epochs). The EMA (started from the pre-trained weights; DeiT's starts from the
randomly initialised model, since it is built before ``--resume`` loads the weights, and is never evaluated)
is reported as an extra.

Example:
    >>> from contrastlab.config.schema import FinetuneConfig
    >>> cfg = FinetuneConfig(epochs=10, warmup_epochs=2, schedule="deit", lr=1e-3, base_batch_size=1024)
    >>> finetune_learning_rate(cfg, step=0, steps_per_epoch=5) == cfg.warmup_lr  # epochs 0 and 1: warmup_lr
    True
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from contrastlab.config.schema import Config, FinetuneConfig, OptimConfig
from contrastlab.data.subsets import evenly_spaced
from contrastlab.engine.checkpoint import FORMAT, VERSION, atomic_save, load_checkpoint
from contrastlab.engine.distributed import all_reduce_mean, barrier
from contrastlab.engine.optim import build_optimizer, set_learning_rate
from contrastlab.engine.schedules import learning_rate
from contrastlab.engine.trainer import PRECISIONS, NonFiniteLossError, epoch_seed, seed_everything
from contrastlab.errors import ConfigError
from contrastlab.models.vit import VIT_ARCHS, build_vit
from contrastlab.observers.classification_monitor import ClassificationMonitor

__all__ = ["FINETUNE_SCHEDULES", "FinetuneClassifier", "TransformedDataset", "finetune", "finetune_backbone",
           "finetune_checkpoint", "finetune_learning_rate", "finetune_param_groups", "finetune_transforms"]

FINETUNE_SCHEDULES = ("cosine", "deit")
MIXUP_MODES = ("batch", "pair", "elem")
NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token")
"""Parameters without weight decay besides 1-D ones and biases (timm's ``VisionTransformer.no_weight_decay``)."""


def _check(cfg: FinetuneConfig) -> None:
    for key, value, valid in (("finetune.schedule", cfg.schedule, FINETUNE_SCHEDULES),
                              ("finetune.mixup_mode", cfg.mixup_mode, MIXUP_MODES),
                              ("finetune.precision", cfg.precision, tuple(PRECISIONS)),
                              ("finetune.interpolation", cfg.interpolation, ("bicubic", "bilinear", "random")),
                              ("finetune.remode", cfg.remode, ("pixel", "rand", "const"))):
        if value not in valid:
            raise ConfigError(f"{key} must be one of {', '.join(valid)}, got {value!r}")


def peak_learning_rate(cfg: FinetuneConfig) -> float:
    """``lr * batch_size / base_batch_size`` (DeiT: ``5e-4 * batch / 512``)."""
    return cfg.lr * cfg.batch_size / cfg.base_batch_size


def finetune_learning_rate(cfg: FinetuneConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate of training step ``step`` (0-based), ``cfg.schedule`` as in the module docstring."""
    _check(cfg)
    peak = peak_learning_rate(cfg)
    if cfg.schedule == "cosine":
        return learning_rate(step, base_lr=peak, total_steps=cfg.epochs * steps_per_epoch,
                             warmup_steps=round(cfg.warmup_epochs * steps_per_epoch), schedule="cosine",
                             warmup_start_lr=cfg.warmup_lr, final_lr=cfg.min_lr)
    t = max(step // steps_per_epoch - 1, 0)  # DeiT: epoch e trains at the rate set after epoch e - 1
    if t < cfg.warmup_epochs:
        return cfg.warmup_lr + t * (peak - cfg.warmup_lr) / cfg.warmup_epochs
    return cfg.min_lr + 0.5 * (peak - cfg.min_lr) * (1.0 + math.cos(math.pi * t / cfg.epochs))


class FinetuneClassifier(nn.Module):
    """A backbone and a linear head ``feature_dim -> num_classes`` (weight truncated-normal std 0.02, bias 0,
    as timm initialises a ViT's head).

    Args:
        backbone: feature extractor ``[B, 3, H, W] -> [B, feature_dim]``.
        feature_dim: its output width.
        num_classes: number of classes.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        from timm.layers import trunc_normal_

        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"classifier": logits}``, what :class:`ClassificationMonitor` reads."""
        return {"classifier": self(x)}


def finetune_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: weight decay on every matrix, none on 1-D parameters, biases and :data:`NO_DECAY_NAMES`.

    Every parameter is made trainable first (what pre-training froze trains here).
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        param.requires_grad_(True)
        leaf = name.rsplit(".", 1)[-1]
        if param.ndim <= 1 or name.endswith(".bias") or leaf in NO_DECAY_NAMES:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class TransformedDataset(Dataset):
    """``(transform(image), label, index)`` of a contrastlab dataset's ``(image, label, index)`` items."""

    def __init__(self, dataset: Dataset, transform: Callable) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image, label, index = self.dataset[i]
        return self.transform(image), label, index


def finetune_transforms(cfg: FinetuneConfig, size: int, mean: tuple[float, ...],
                        std: tuple[float, ...]) -> tuple[Callable, Callable]:
    """timm's training transform (RandomResizedCrop, flip, RandAugment, colour jitter, random erasing) and its
    test transform (resize to ``size / crop_fraction``, centre crop), as DeiT's ``build_transform``."""
    from timm.data import create_transform

    train = create_transform(input_size=size, is_training=True, color_jitter=cfg.color_jitter,
                             auto_augment=cfg.randaugment or None, interpolation=cfg.interpolation,
                             re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount, mean=mean, std=std)
    test = create_transform(input_size=size, is_training=False, interpolation="bicubic",
                            crop_pct=cfg.crop_fraction, mean=mean, std=std)
    return train, test


def _criterion(cfg: FinetuneConfig, mixing: bool) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixing:  # label smoothing is inside the mixed targets
        return SoftTargetCrossEntropy()
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
    return nn.CrossEntropyLoss()


def _train_sampler(dataset: Dataset, cfg: FinetuneConfig, world: int, rank: int, seed: int):
    if cfg.repeated_aug > 1:
        from timm.data.distributed_sampler import RepeatAugSampler

        return RepeatAugSampler(dataset, num_replicas=world, rank=rank, shuffle=True, num_repeats=cfg.repeated_aug)
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)


def finetune(
    model: FinetuneClassifier,
    train_set: Dataset,
    test_set: Dataset,
    cfg: FinetuneConfig,
    out: str | Path,
    *,
    device: torch.device | str = "cpu",
    workers: int = 4,
    seed: int = 0,
    resume: str | Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Fine-tune ``model`` end to end on ``train_set`` and report its final top-1 on ``test_set``.

    Args:
        model: backbone + head (:class:`FinetuneClassifier`) with the pre-trained backbone weights loaded.
        train_set: ``(image tensor, label, index)`` items, training transform applied
            (:class:`TransformedDataset` with :func:`finetune_transforms`).
        test_set: the same with the test transform.
        cfg: the protocol.
        out: folder for ``checkpoints/last.pt`` (every epoch) and ``metrics.jsonl``.
        device: where to train.
        workers: DataLoader workers per rank.
        seed: seeds each epoch's random streams (augmentations, mixup, the sampler without repeated augmentation;
            DeiT's repeated-augmentation sampler orders each epoch from the epoch number alone).
        resume: a fine-tuning checkpoint (``out/checkpoints/last.pt``) to continue from its next epoch.
        rank: this process's rank under ``torchrun`` (the process group must be initialised when ``world_size > 1``).
        world_size: number of ranks; ``cfg.batch_size`` is the global batch.
        log: where progress lines go.
        trust_pickle: open a ``resume`` file holding Python objects besides tensors (may run code from the file).

    Returns:
        ``finetune_top1`` (the model after the final epoch), ``finetune_ema_top1`` (its EMA, when on) and the
        protocol.

    Raises:
        ConfigError: an invalid choice, or a batch that does not split over the ranks (or is odd with mixup).
    """
    from timm.data import Mixup
    from timm.utils import ModelEmaV2

    _check(cfg)
    device = torch.device(device)
    if cfg.batch_size % world_size:
        raise ConfigError(f"finetune.batch_size={cfg.batch_size} is the global batch and must be divisible by the "
                          f"{world_size} ranks")
    per_rank = cfg.batch_size // world_size
    mixing = cfg.mixup > 0 or cfg.cutmix > 0
    if mixing and cfg.mixup_mode == "batch" and per_rank % 2:
        raise ConfigError(f"mixup/cutmix pair the images of a batch: the per-rank batch ({per_rank}) must be even")
    num_classes = model.head.out_features
    out = Path(out)
    main = rank == 0
    model = model.to(device)
    ema = ModelEmaV2(model, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    optimizer = build_optimizer(finetune_param_groups(model, cfg.weight_decay),
                                OptimConfig(name="adamw", betas=list(cfg.betas), weight_decay=cfg.weight_decay),
                                peak_learning_rate(cfg))
    amp_dtype = PRECISIONS[cfg.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16" and device.type == "cuda")
    start_epoch = 0
    if resume is not None:
        state = load_checkpoint(resume, trust_pickle=trust_pickle)
        if state.get("kind") != "finetune":
            raise ConfigError(f"{resume} is not a fine-tuning checkpoint (written by `contrastlab eval finetune`)")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        start_epoch = state["epoch"]
    net: nn.Module = model
    if world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = _train_sampler(train_set, cfg, world_size, rank, seed)
    loader = DataLoader(train_set, batch_size=per_rank, sampler=sampler, num_workers=workers, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ConfigError(f"finetune.batch_size={cfg.batch_size} is larger than an epoch of the training set "
                          f"({len(sampler)} images per rank); lower it")
    mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                  switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.label_smoothing,
                  num_classes=num_classes) if mixing else None
    criterion = _criterion(cfg, mixing)
    test_loader = DataLoader(test_set, batch_size=max(1, per_rank), shuffle=False, num_workers=workers)
    monitor = ClassificationMonitor(test_loader, device)
    metrics = out / "metrics.jsonl"
    if main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        if start_epoch == 0:
            metrics.unlink(missing_ok=True)
        log(f"fine-tuning: {len(train_set)} training images, {num_classes} classes, {cfg.epochs} epochs of "
            f"{steps_per_epoch} steps, global batch {cfg.batch_size}, peak lr {peak_learning_rate(cfg):.4g} "
            f"({cfg.schedule}), {world_size} rank(s), device {device}, out {out}")
    step = start_epoch * steps_per_epoch
    lr = finetune_learning_rate(cfg, step, steps_per_epoch)
    for epoch in range(start_epoch, cfg.epochs):
        seed_everything(epoch_seed(seed, rank, epoch))
        sampler.set_epoch(epoch)
        net.train()
        t0, loss_sum = time.perf_counter(), torch.zeros((), device=device)
        for images, labels, _ in loader:
            lr = finetune_learning_rate(cfg, step, steps_per_epoch)
            set_learning_rate(optimizer, lr, lr)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if mixup is not None:
                images, labels = mixup(images, labels)
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                logits = net(images)
            loss = criterion(logits.float(), labels)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"fine-tuning loss {loss.item()} at step {step} (epoch {epoch + 1}), lr "
                                         f"{lr:.4g}; lower finetune.lr or use finetune.precision=fp32")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update(model)
            loss_sum += loss.detach()
            step += 1
        epoch_loss = float(all_reduce_mean(loss_sum / steps_per_epoch))
        record: dict[str, Any] = {"epoch": epoch + 1, "step": step, "loss": epoch_loss, "lr": lr,
                                  "epoch_seconds": round(time.perf_counter() - t0, 3)}
        last = epoch + 1 == cfg.epochs
        if main and (last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
            record["test_top1"] = monitor.evaluate(model)["classifier"]
            if ema is not None:
                record["test_top1_ema"] = monitor.evaluate(ema.module)["classifier"]
        if main:
            atomic_save({"format": FORMAT, "version": VERSION, "kind": "finetune", "epoch": epoch + 1, "step": step,
                         "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "ema": None if ema is None else ema.module.state_dict(),
                         "finetune": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}},
                        out / "checkpoints" / "last.pt")
            with metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")
            log(f"epoch {epoch + 1}/{cfg.epochs}: loss {epoch_loss:.4f}, lr {lr:.4g}"
                + (f", test top-1 {record['test_top1']:.2f}%" if "test_top1" in record else ""))
        barrier()
    result: dict[str, Any] = {"epochs": cfg.epochs, "steps": step, "steps_per_epoch": steps_per_epoch,
                              "global_batch": cfg.batch_size, "peak_lr": peak_learning_rate(cfg),
                              "schedule": cfg.schedule, "out": str(out),
                              "protocol": "end-to-end fine-tuning (DeiT recipe), top-1 after the final epoch, eval "
                                          "mode, one centre view per test image"}
    if main:
        final = {} if start_epoch >= cfg.epochs else record
        result["finetune_top1"] = final.get("test_top1", monitor.evaluate(model)["classifier"])
        if ema is not None:
            result["finetune_ema_top1"] = final.get("test_top1_ema", monitor.evaluate(ema.module)["classifier"])
    return result


def finetune_backbone(cfg: Config) -> tuple[nn.Module, int]:
    """The run's backbone for fine-tuning: a ViT with ``finetune.drop_path`` stochastic depth, any other backbone
    as trained (``finetune.drop_path`` must then be 0)."""
    from contrastlab import assemble

    arch = cfg.model.arch
    if arch in VIT_ARCHS:
        return build_vit(arch, img_size=assemble.image_size(cfg), drop_path_rate=cfg.finetune.drop_path)
    if cfg.finetune.drop_path > 0:
        raise ConfigError(f"finetune.drop_path={cfg.finetune.drop_path} is a ViT's stochastic depth; model.arch={arch!r} "
                          f"has none: set finetune.drop_path=0 (ViTs: {', '.join(VIT_ARCHS)})")
    return assemble.backbone(cfg)


def finetune_checkpoint(ckpt: dict[str, Any], cfg: Config, source: str, out: str | Path, *, peer: int | None = None,
                        resume: str | Path | None = None,
                        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
                        trust_pickle: bool = False, module: str = "backbone") -> dict[str, Any]:
    """Fine-tune the backbone of a pre-training checkpoint with ``cfg.finetune`` (``contrastlab eval finetune``).

    The labelled training split (``data.labeled_split`` or ``data.train_split``; ``data.subset`` keeps an evenly
    spaced subset) and the test split (``monitor.max_test`` likewise) of ``cfg.data`` are read at
    ``data.image_size``; the head is initialised from ``seed``. Under ``torchrun`` every rank trains its share of
    the global batch.

    Args:
        ckpt: a checkpoint from :func:`~contrastlab.engine.checkpoint.load_checkpoint`.
        cfg: its config with the fine-tuning protocol and any overrides.
        source: the checkpoint's path, for messages.
        out: the fine-tuning folder.
        peer: cohort methods: fine-tune peer ``peer``.
        module: the checkpoint's copy of the backbone to start from (``backbone``, or the method's momentum copy).
        resume: a fine-tuning checkpoint to continue, or ``"auto"`` (``out/checkpoints/last.pt`` when present).
        log: where progress lines go.
        trust_pickle: open a ``resume`` file holding Python objects besides tensors (may run code from the file).
    """
    from contrastlab import assemble
    from contrastlab.engine.checkpoint import load_backbone_weights
    from contrastlab.engine.distributed import init_distributed
    from contrastlab.engine.trainer import select_device

    _check(cfg.finetune)
    denv = init_distributed("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
    device = select_device(cfg.train.device, denv.local_rank)
    net, dim = finetune_backbone(cfg)
    load_backbone_weights(net, ckpt, source, peer=peer, module=module)
    train_base = assemble.labeled_dataset(cfg) if cfg.data.labeled_split else assemble.training_dataset(cfg)
    test_base = evenly_spaced(assemble.dataset(cfg, cfg.data.test_split), cfg.monitor.max_test)
    mean, std = assemble.normalization(cfg)
    train_tf, test_tf = finetune_transforms(cfg.finetune, assemble.image_size(cfg), mean, std)
    torch.manual_seed(cfg.seed)
    model = FinetuneClassifier(net, dim, len(train_base.classes))
    out = Path(out)
    if resume == "auto":
        last = out / "checkpoints" / "last.pt"
        resume = last if last.is_file() else None
    return finetune(model, TransformedDataset(train_base, train_tf), TransformedDataset(test_base, test_tf),
                    cfg.finetune, out, device=device, workers=cfg.data.workers, seed=cfg.seed, resume=resume,
                    rank=denv.rank, world_size=denv.world_size, log=log, trust_pickle=trust_pickle)
