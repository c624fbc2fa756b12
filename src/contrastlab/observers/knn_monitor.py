"""Online kNN monitor: backbone features of the training set as the bank, accuracy on the test split.

Features are the backbone's pooled output in eval mode (no projector), one deterministic view per image
(:func:`contrastlab.views.eval_view_dataset`), rendered by CPU workers or, when training runs from a
device-resident store, on the device (:class:`~contrastlab.data.device_loader.DeviceEvalLoader`), where the
neighbours are then also found. Every rank computes the same number; only rank 0 runs it
when distributed, the others wait at a barrier.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from contrastlab.data.device_images import DeviceImages
from contrastlab.data.device_loader import evaluation_loader
from contrastlab.eval.features import extract_features
from contrastlab.eval.knn import knn_accuracy


def _subset(ds: Dataset, limit: int, seed: int) -> Dataset:
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
    """

    def __init__(self, bank_set: Dataset, test_set: Dataset, num_classes: int, *, k: int = 200,
                 temperature: float = 0.1, batch_size: int = 256, workers: int = 0,
                 max_bank: int = 0, max_test: int = 0, bank_fraction: float = 1.0,
                 device: torch.device | str = "cpu", on_device: bool = False,
                 store: DeviceImages | None = None) -> None:
        self.k, self.temperature, self.num_classes = k, temperature, num_classes
        self.bank_fraction = bank_fraction
        self.device = torch.device(device)
        self.on_device = on_device
        loader_kw = {"batch_size": batch_size, "workers": workers, "device": self.device, "on_device": on_device}
        self.bank_loader = evaluation_loader(_subset(bank_set, max_bank, 0), store=store, **loader_kw)
        self.test_loader = evaluation_loader(_subset(test_set, max_test, 1), **loader_kw)

    def describe(self) -> dict:
        """How the number is measured."""
        return {"knn_k": self.k, "knn_temperature": self.temperature, "knn_features": "backbone",
                "knn_bank_fraction": self.bank_fraction, "knn_bank_size": len(self.bank_loader.dataset),
                "knn_test_size": len(self.test_loader.dataset),
                "knn_views": "device" if self.on_device else "cpu-workers"}

    def label(self) -> str:
        """A one-line description for logs: ``k=20, T=0.2, backbone features, bank 20% of train (n=...)``."""
        bank = f"bank {len(self.bank_loader.dataset)} images"
        if self.bank_fraction < 1.0:
            bank += f" ({self.bank_fraction:.0%} of each training class)"
        return f"k={self.k}, T={self.temperature}, backbone features, {bank}"

    def evaluate(self, backbone: nn.Module) -> float:
        """Top-1 accuracy in percent."""
        bank, bank_labels = extract_features(backbone, self.bank_loader, self.device, self.on_device)
        feats, labels = extract_features(backbone, self.test_loader, self.device, self.on_device)
        return knn_accuracy(feats, labels, bank, bank_labels, self.num_classes, self.k, self.temperature)
