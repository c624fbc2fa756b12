"""Feature extraction with a frozen backbone (eval mode, no gradient)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features and labels of every sample the loader yields, in order.

    The loader yields ``(views, label, index)`` with a single view (or a plain image tensor). The
    backbone's training mode is restored afterwards.
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for images, target, _ in loader:
        if isinstance(images, (list, tuple)):
            images = images[0]
        feats.append(backbone(images.to(device, non_blocking=True)).float().cpu())
        labels.append(torch.as_tensor(target))
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)
