"""Linear probe: a linear classifier on the frozen backbone's features (Zhang et al. 2016; He et al. 2020).

The backbone stays in eval mode (BatchNorm uses its running statistics) with gradients off, and is
checked bit for bit after training to prove it did not change. The reported accuracy is the one after
the final epoch, never the best epoch on the test set.

Two modes:

* ``augment=True`` (the MoCo / SimCLR protocol): each epoch re-renders RandomResizedCrop + flip views
  and the backbone runs on every batch;
* ``augment=False``: features of one deterministic view are computed once and the classifier trains on
  them (much faster; a lower bound on the augmented protocol).

With ``on_device`` every view is rendered on the device in batches, from images held there or from image
files decoded per batch (:mod:`contrastlab.data.device_loader`), as the GPU training pipeline does; the same
protocol otherwise.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from contrastlab.config.schema import LinearConfig, OptimConfig
from contrastlab.data.device_images import DeviceImages, decoded_per_batch
from contrastlab.data.device_loader import DeviceViewLoader, FileViewLoader, evaluation_loader
from contrastlab.engine.optim import OPTIMIZERS, build_optimizer
from contrastlab.engine.schedules import epoch_learning_rate
from contrastlab.errors import ConfigError
from contrastlab.eval.features import extract_features
from contrastlab.views.batch_views import BatchViews
from contrastlab.views.dataset import ViewDataset


def state_fingerprint(module: nn.Module) -> str:
    """SHA-256 over every parameter and buffer, in order: equal fingerprints mean identical weights."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _epoch_lr(cfg: LinearConfig, epoch: int) -> float:
    """The probe's rate in ``epoch``: ``linear.schedule`` from ``linear.lr`` (step: x0.1 per milestone)."""
    return epoch_learning_rate(epoch, base_lr=cfg.lr, total_epochs=cfg.epochs, schedule=cfg.schedule,
                               milestones=tuple(cfg.milestones), gamma=0.1)


@torch.no_grad()
def _accuracy(classifier: nn.Module, feats: torch.Tensor, labels: torch.Tensor, device: torch.device) -> tuple[float, float]:
    logits = classifier(feats.to(device)).float().cpu()
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    top1 = (top[:, 0] == labels).float().mean().item() * 100
    top5 = (top == labels[:, None]).any(dim=1).float().mean().item() * 100
    return top1, top5


class _ShuffledDeviceViews:
    """The augmented training views of a linear probe rendered on the device: a new shuffle each epoch (drawn
    from ``generator`` on the host), every batch rendered from the images held there (:class:`DeviceViewLoader`),
    or, for image files of various sizes, read by ``workers`` and decoded per batch (:class:`FileViewLoader`)."""

    def __init__(self, train_set: Any, device: torch.device, batch_size: int, generator: torch.Generator,
                 seed: int, workers: int) -> None:
        if not isinstance(train_set, ViewDataset):
            raise TypeError(f"linear_probe(on_device=True) renders a ViewDataset, got {type(train_set).__name__}")
        base, views = train_set.dataset, BatchViews.from_view_dataset(train_set)
        if decoded_per_batch(base):
            self.loader: DeviceViewLoader | FileViewLoader = FileViewLoader(base, views, device, seed, workers=workers)
        else:
            self.loader = DeviceViewLoader(DeviceImages.from_dataset(base, device), views, seed)
        self.size, self.batch_size, self.generator, self.epoch = len(base), batch_size, generator, 0

    def __iter__(self):
        """One epoch (the next: each pass is one)."""
        order = torch.randperm(self.size, generator=self.generator)
        batches = [b.tolist() for b in order.split(self.batch_size)]
        yield from self.loader(batches[:-1], self.epoch)  # one index table needs equal batches: the last apart
        yield from self.loader(batches[-1:], self.epoch, start=len(batches) - 1)
        self.epoch += 1


def linear_probe(
    backbone: nn.Module,
    feature_dim: int,
    num_classes: int,
    train_set: Dataset,
    test_set: Dataset,
    cfg: LinearConfig,
    *,
    device: torch.device | str = "cpu",
    workers: int = 0,
    seed: int = 0,
    on_device: bool = False,
    log=print,
) -> dict[str, Any]:
    """Train a linear classifier on frozen features and return final-epoch test accuracy.

    Args:
        backbone: the pre-trained encoder; frozen and kept in eval mode.
        train_set: yields ``(views, label, index)``: augmented views when ``cfg.augment``, else one
            deterministic view; ``test_set`` always one deterministic view.
        cfg: epochs, lr, optimizer, schedule, batch size.
        on_device: Render the views on ``device`` (``train_set`` and ``test_set`` must then be ``ViewDataset``
            objects, optionally inside subsets) instead of in ``workers`` CPU workers.

    Returns:
        ``top1``, ``top5`` (percent, final epoch), the settings, and ``backbone_unchanged``.
    """
    OPTIMIZERS.check(cfg.optimizer, "linear.optimizer")
    device = torch.device(device)
    torch.manual_seed(seed)
    backbone = backbone.to(device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    before = state_fingerprint(backbone)

    classifier = nn.Linear(feature_dim, num_classes).to(device)
    nn.init.normal_(classifier.weight, std=0.01)
    nn.init.zeros_(classifier.bias)
    settings = OptimConfig(name=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    opt = build_optimizer([{"params": list(classifier.parameters())}], settings, cfg.lr)

    in_order = {"batch_size": cfg.batch_size, "workers": workers, "device": device, "on_device": on_device}
    test_feats, test_labels = extract_features(backbone, evaluation_loader(test_set, **in_order), device)
    g = torch.Generator().manual_seed(seed)
    if cfg.augment and on_device:
        train_loader: Any = _ShuffledDeviceViews(train_set, device, cfg.batch_size, g, seed, workers)
    elif cfg.augment:
        train_loader = DataLoader(train_set, shuffle=True, drop_last=False, generator=g, batch_size=cfg.batch_size,
                                  num_workers=workers, pin_memory=device.type == "cuda")
    else:
        feats, labels = extract_features(backbone, evaluation_loader(train_set, **in_order), device)
        train_loader = DataLoader(TensorDataset(feats, labels, torch.arange(len(labels))),
                                  batch_size=cfg.batch_size, shuffle=True, generator=g)

    for epoch in range(cfg.epochs):
        for group in opt.param_groups:
            group["lr"] = _epoch_lr(cfg, epoch)
        classifier.train()
        total, count = torch.zeros((), device=device), 0  # the loss sum stays on the device: no sync per step
        for x, y, _ in train_loader:
            if cfg.augment:
                x = x[0] if isinstance(x, (list, tuple)) else x
                with torch.no_grad():
                    x = backbone(x.to(device, non_blocking=True)).float()
            x, y = x.to(device), torch.as_tensor(y).to(device)
            loss = F.cross_entropy(classifier(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(y)
            count += len(y)
        if epoch == cfg.epochs - 1 or (epoch + 1) % max(1, cfg.epochs // 5) == 0:
            top1, _ = _accuracy(classifier, test_feats, test_labels, device)
            log(f"linear epoch {epoch + 1}/{cfg.epochs}: train loss {float(total) / max(1, count):.4f}, "
                f"test top-1 {top1:.2f}%")

    top1, top5 = _accuracy(classifier, test_feats, test_labels, device)
    unchanged = state_fingerprint(backbone) == before
    if not unchanged:
        raise RuntimeError("the backbone changed during the linear probe; this is a bug, please report it")
    return {
        "top1": top1, "top5": top5, "reported_epoch": cfg.epochs, "protocol": "final epoch, frozen backbone in eval mode",
        "epochs": cfg.epochs, "lr": cfg.lr, "optimizer": cfg.optimizer, "schedule": cfg.schedule,
        "batch_size": cfg.batch_size, "weight_decay": cfg.weight_decay, "augment": cfg.augment,
        "backbone_unchanged": unchanged, "train_size": len(train_set), "test_size": len(test_set),
        "views": "device" if on_device else "cpu-workers",
    }


def classifier_accuracy(backbone: nn.Module, weight: torch.Tensor, bias: torch.Tensor, test_set: Dataset, *,
                        device: torch.device | str = "cpu", batch_size: int = 256, workers: int = 0,
                        on_device: bool = False) -> dict[str, Any]:
    """Test accuracy of a given linear classifier on the frozen backbone's features, without training.

    For a classifier that came with the weights (an imported linear-probe file, ``contrastlab eval linear
    --stored-classifier``): the same frozen, eval-mode features as :func:`linear_probe`, the same top-1 / top-5.

    Args:
        weight: ``[C, D]`` classifier weight on the backbone's ``D`` features.
        bias: ``[C]``.
        test_set: one deterministic view per image.

    Raises:
        ConfigError: the classifier does not fit the backbone's features.
    """
    device = torch.device(device)
    backbone = backbone.to(device).eval()
    feats, labels = extract_features(backbone, evaluation_loader(test_set, batch_size=batch_size, workers=workers,
                                                                 device=device, on_device=on_device), device)
    if weight.dim() != 2 or weight.shape[1] != feats.shape[1] or bias.shape != weight.shape[:1]:
        raise ConfigError(f"the stored classifier has weight {list(weight.shape)} / bias {list(bias.shape)}; the "
                          f"backbone gives {feats.shape[1]} features")
    classifier = nn.Linear(weight.shape[1], weight.shape[0]).to(device)
    with torch.no_grad():
        classifier.weight.copy_(weight)
        classifier.bias.copy_(bias)
    top1, top5 = _accuracy(classifier, feats, labels, device)
    return {"top1": top1, "top5": top5, "protocol": "stored classifier, frozen backbone in eval mode, no training",
            "test_size": len(test_set), "views": "device" if on_device else "cpu-workers"}

