"""Feature extraction with a frozen backbone (eval mode, no gradient)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: Iterable, device: torch.device,
                     keep_on_device: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features and labels of every sample the loader yields, in order.

    The loader (a ``DataLoader`` or a :class:`~contrastlab.data.device_loader.DeviceEvalLoader`) yields
    ``(views, label, index)`` with a single view (or a plain image tensor). Features and labels come back on the
    CPU, or on ``device`` with ``keep_on_device`` (no copy per batch: the kNN monitor votes there). The
    backbone's training mode is restored afterwards.
    """
    home = torch.device(device) if keep_on_device else torch.device("cpu")
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for images, target, _ in loader:
        if isinstance(images, (list, tuple)):
            images = images[0]
        feats.append(backbone(images.to(device, non_blocking=True)).float().to(home))
        labels.append(torch.as_tensor(target).to(home))
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)
