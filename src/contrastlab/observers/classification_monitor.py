"""Test-set accuracy of a method's own classifiers (supervised baselines, MCL cohorts).

For every head that :meth:`~contrastlab.methods.base.Method.predict` returns (MCL: ``peer0`` ...
``peerM-1`` and ``ensemble``, the sum of the peers' logits) the monitor reports top-1 accuracy in percent
on one deterministic view per test image, the network in eval mode. When there are peer heads it adds
``peer_mean`` and ``peer_best``. The numbers of a run are those of its final epoch: no epoch is ever
selected on the test set (MCL's release kept the epoch with the best test accuracy; github.com/winycg/MCL).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from contrastlab.data.device_loader import DeviceEvalLoader


class ClassificationMonitor:
    """Top-1 accuracy of each classifier head of a method on a test set.

    Args:
        loader: In-order batches ``(views, labels, index)`` of one evaluation view per test image, with a
            ``dataset`` (:func:`~contrastlab.data.device_loader.evaluation_loader`). The trainer passes the kNN
            monitor's test loader, so the two monitors read (and, on the device, hold) one copy of the test split.
        device: where the method runs.
    """

    def __init__(self, loader: DataLoader | DeviceEvalLoader, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.loader = loader

    @torch.no_grad()
    def evaluate(self, method: nn.Module) -> dict[str, float]:
        """``{head: top-1 %}`` plus ``peer_mean`` and ``peer_best`` when heads are named ``peer<i>``."""
        was_training = method.training
        method.eval()
        correct: dict[str, int] = {}
        total = 0
        try:
            for images, labels, _ in self.loader:
                images = images[0] if isinstance(images, (list, tuple)) else images
                scores = method.predict(images.to(self.device, non_blocking=True))
                labels = torch.as_tensor(labels).to(self.device)
                for head, logits in scores.items():
                    hits = (logits.argmax(dim=1) == labels).sum()
                    correct[head] = correct.get(head, 0) + hits  # a device tensor: read once at the end
                total += labels.numel()
        finally:
            method.train(was_training)
        result = {head: 100.0 * int(hits) / max(1, total) for head, hits in correct.items()}
        peers = [v for k, v in result.items() if k.startswith("peer")]
        if peers:
            result["peer_mean"] = sum(peers) / len(peers)
            result["peer_best"] = max(peers)
        return result

    def describe(self) -> dict:
        """How the numbers are measured."""
        return {"test_top1_protocol": "final epoch, eval mode, one centre view per test image",
                "test_size": len(self.loader.dataset)}
