"""Online kNN monitor: backbone features of the training set as the bank, accuracy on the test split.

Features are the backbone's pooled output in eval mode (no projector), one deterministic view per image
(:func:`contrastlab.views.eval_view_dataset`), rendered by CPU workers or, when training runs from a
device-resident store, on the device (:class:`~contrastlab.data.device_loader.DeviceEvalLoader`), where the
neighbours are then also found. Every rank computes the same number; only rank 0 runs it
when distributed, the others wait at a barrier.

As an observer (``knn`` in the config list ``observers``), :class:`KNNObserver` evaluates after the epochs
``monitor.knn_every`` and ``monitor.knn_every_epoch_until`` select and after the last one, adds ``knn_top1`` to
the epoch's record and the run's results, and guards against collapse (``monitor.collapse_threshold``: CaCo's
release stopped a run whose kNN accuracy fell to chance).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from contrastlab.data.device_images import DeviceImages
from contrastlab.data.device_loader import evaluation_loader
from contrastlab.errors import ContrastlabError
from contrastlab.eval.features import extract_features
from contrastlab.eval.knn import knn_accuracy
from contrastlab.observers.base import Observer, Run, evaluation_batch_size
from contrastlab.observers.test_split import evaluate_on_device, test_loader
from contrastlab.registry import register_observer


class CollapseError(ContrastlabError):
    """The kNN collapse guard stopped a run whose representation collapsed."""


def fixed_subset(ds: Dataset, limit: int, seed: int) -> Dataset:
    """A random subset of at most ``limit`` items drawn with ``seed`` (``ds`` itself when ``limit`` is 0)."""
    if limit <= 0 or limit >= len(ds):
        return ds
    g = torch.Generator().manual_seed(seed)
    return Subset(ds, torch.randperm(len(ds), generator=g)[:limit].tolist())


class KNNMonitor:
    """Computes weighted-kNN top-1 (Wu et al. 2018) of a backbone on demand.

    Args:
        bank_set / test_set: evaluation-view datasets yielding ``(views, label, index)``.
        num_classes: number of classes.
        k / temperature: kNN settings (reported alongside the accuracy).
        max_bank / max_test: random subsets (fixed seed) to bound the cost; 0 = all.
        bank_fraction: the class-balanced share of the training split that ``bank_set`` holds (reported
            only; :func:`contrastlab.data.subsets.class_balanced_subset` selects it).
        on_device: Render the views and vote on ``device`` instead of in CPU workers.
        store: With ``on_device``, the training store when it holds ``bank_set``'s base images (not copied twice).
        test_loader: Ready in-order batches of the test views (shared with another monitor); then ``test_set``
            and ``max_test`` are not used.
    """

    def __init__(self, bank_set: Dataset, test_set: Dataset, num_classes: int, *, k: int = 200,
                 temperature: float = 0.1, batch_size: int = 256, workers: int = 0,
                 max_bank: int = 0, max_test: int = 0, bank_fraction: float = 1.0,
                 device: torch.device | str = "cpu", on_device: bool = False,
                 store: DeviceImages | None = None, test_loader: Any = None) -> None:
        self.k, self.temperature, self.num_classes = k, temperature, num_classes
        self.bank_fraction = bank_fraction
        self.device = torch.device(device)
        self.on_device = on_device
        loader_kw = {"batch_size": batch_size, "workers": workers, "device": self.device, "on_device": on_device}
        self.bank_loader = evaluation_loader(fixed_subset(bank_set, max_bank, 0), store=store, **loader_kw)
        self.test_loader = test_loader or evaluation_loader(fixed_subset(test_set, max_test, 1), **loader_kw)

    @property
    def k_used(self) -> int:
        """The neighbours that vote: ``k``, or the whole bank when it holds fewer images."""
        return min(self.k, len(self.bank_loader.dataset))

    def describe(self) -> dict:
        """How the number is measured (``knn_k`` is the number of neighbours that voted; ``knn_k_asked`` when the
        bank was smaller than ``monitor.knn_k``)."""
        asked = {"knn_k_asked": self.k} if self.k_used != self.k else {}
        return {"knn_k": self.k_used, **asked, "knn_temperature": self.temperature, "knn_features": "backbone",
                "knn_bank_fraction": self.bank_fraction, "knn_bank_size": len(self.bank_loader.dataset),
                "knn_test_size": len(self.test_loader.dataset),
                "knn_views": "device" if self.on_device else "cpu-workers"}

    def label(self) -> str:
        """A one-line description for logs: ``k=20, T=0.2, backbone features, bank 20% of train (n=...)``."""
        bank = f"bank {len(self.bank_loader.dataset)} images"
        if self.bank_fraction < 1.0:
            bank += f" ({self.bank_fraction:.0%} of each training class)"
        k = f"k={self.k_used}" + (f" (the whole bank; monitor.knn_k={self.k})" if self.k_used != self.k else "")
        return f"{k}, T={self.temperature}, backbone features, {bank}"

    def evaluate(self, backbone: nn.Module) -> float:
        """Top-1 accuracy in percent."""
        bank, bank_labels = extract_features(backbone, self.bank_loader, self.device, self.on_device)
        feats, labels = extract_features(backbone, self.test_loader, self.device, self.on_device)
        return knn_accuracy(feats, labels, bank, bank_labels, self.num_classes, self.k, self.temperature)


def evaluated_backbone(run: Run) -> nn.Module:
    """The backbone ``model.evaluated_network`` names: the online one, or the method's momentum copy."""
    from contrastlab.methods.base import evaluated_module

    return run.method.get_submodule(evaluated_module(type(run.method), run.config.model.evaluated_network))


class KNNObserver(Observer):
    """The kNN monitor during training, with the collapse guard (``monitor.*`` settings); rank 0 only."""

    def __init__(self, monitor: KNNMonitor) -> None:
        self.monitor = monitor
        self.top1: float | None = None

    def on_epoch_end(self, run: Run, record: dict[str, Any]) -> None:
        m, epoch = run.config.monitor, run.epoch
        if not (run.last_epoch or (m.knn_every > 0 and epoch % m.knn_every == 0) or epoch <= m.knn_every_epoch_until):
            return
        self.top1 = record["knn_top1"] = self.monitor.evaluate(evaluated_backbone(run))
        run.log(f"epoch {epoch}: kNN top-1 {self.top1:.2f}% ({self.monitor.label()})")
        if m.collapse_threshold > 0 and epoch >= m.collapse_after_epoch and self.top1 <= m.collapse_threshold:
            run.request_stop(CollapseError(
                f"kNN top-1 is at or below monitor.collapse_threshold={m.collapse_threshold}% at epoch {epoch} "
                f"(collapse guard from epoch {m.collapse_after_epoch}): the representation has collapsed, so the run "
                f"stops (checkpoint {run.out / 'checkpoints' / 'last.pt'} kept). Lower optim.lr or the method's "
                "memory/queue learning rate, or set monitor.collapse_threshold=0."))

    def on_finish(self, run: Run, results: dict[str, Any]) -> None:
        if self.top1 is None:  # a run resumed after its last epoch
            self.top1 = self.monitor.evaluate(evaluated_backbone(run))
        results["knn_top1"] = self.top1
        results["knn_network"] = run.config.model.evaluated_network
        results.update(self.monitor.describe())


@register_observer("knn")
def knn_observer(run: Run) -> KNNObserver | None:
    """``knn``: on rank 0 when the training set has classes; the bank is ``data.labeled_split`` or the training set."""
    from contrastlab import assemble

    if not run.is_main or run.num_classes < 2:
        return None
    cfg, base, test = run.config, run.train_dataset, run.test_dataset
    bank = assemble.labeled_dataset(cfg, base)
    store = getattr(run.device_views, "store", None) if bank is base else None  # images held on the device
    monitor = assemble.knn_monitor(cfg, bank, test, run.device, batch_size=evaluation_batch_size(run),
                                   on_device=evaluate_on_device(run, test), store=store, test_loader=test_loader(run))
    return KNNObserver(monitor)
