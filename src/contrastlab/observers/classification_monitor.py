"""Test-set accuracy of a method's own classifiers (supervised baselines, MCL cohorts).

For every head that :meth:`~contrastlab.methods.base.Method.predict` returns (MCL: ``peer0`` ...
``peerM-1`` and ``ensemble``, the sum of the peers' logits) the monitor reports top-1 accuracy in percent
on one deterministic view per test image, the network in eval mode. When there are peer heads it adds
``peer_mean`` and ``peer_best``. The numbers of a run are those of its final epoch: no epoch is ever
selected on the test set (MCL's release kept the epoch with the best test accuracy, winycg/MCL ``main_cifar.py``).

As an observer (``test_accuracy`` in the config list ``observers``), :class:`TestAccuracyObserver` evaluates after
every ``monitor.classify_every`` epochs and the last one, on the monitors' shared test loader.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from contrastlab.data.device_loader import DeviceEvalLoader
from contrastlab.observers.base import Observer, Run
from contrastlab.observers.test_split import test_loader
from contrastlab.registry import register_observer


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


class TestAccuracyObserver(Observer):
    """Test-set top-1 of the method's classifier heads during training (rank 0); the final epoch's is the result."""

    def __init__(self, monitor: ClassificationMonitor) -> None:
        self.monitor = monitor
        self.final: dict[str, float] | None = None

    def on_epoch_end(self, run: Run, record: dict[str, Any]) -> None:
        every = run.config.monitor.classify_every
        if run.last_epoch or (every > 0 and run.epoch % every == 0):
            record["test_top1"] = self.monitor.evaluate(run.method)
            run.log(f"epoch {run.epoch}: test top-1 " + ", ".join(f"{k} {v:.2f}%" for k, v in record["test_top1"].items()))
            self.final = record["test_top1"] if run.last_epoch else None

    def on_finish(self, run: Run, results: dict[str, Any]) -> None:
        if self.final is not None:  # the final epoch's, never a selected epoch
            results["test_top1"] = self.final
            results.update(self.monitor.describe())

    def state_dict(self) -> dict[str, Any]:
        return {"final": self.final}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.final = state.get("final")


@register_observer("test_accuracy")
def test_accuracy_observer(run: Run) -> TestAccuracyObserver | None:
    """``test_accuracy``: on rank 0, for methods with classifiers (``Method.predict``) and a labelled training set."""
    from contrastlab.methods.base import Method

    if not run.is_main or run.num_classes < 2 or type(run.method).predict is Method.predict:
        return None
    return TestAccuracyObserver(ClassificationMonitor(test_loader(run), run.device))
