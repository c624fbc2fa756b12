"""Weighted k-nearest-neighbour classification on L2-normalised features.

The protocol of Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance
Discrimination"), used as the kNN monitor by MoCo, ContrastiveCrop and most SSL codebases: cosine
similarity to every bank feature, the top ``k`` neighbours vote for their class with weight
``exp(similarity / temperature)``, and the class with the largest summed weight wins.

Example:
    >>> pred = knn_predict(test_feats, bank_feats, bank_labels, num_classes=10, k=200, temperature=0.1)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(
    features: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predicted class of each row of ``features`` [N, D] given a bank [M, D] with labels [M].

    Features are L2-normalised here. ``k`` is clipped to the bank size.
    """
    features = F.normalize(features.float(), dim=1)
    bank = F.normalize(bank.float(), dim=1)
    bank_labels = bank_labels.long()
    k = min(k, bank.shape[0])
    preds = []
    for start in range(0, features.shape[0], chunk_size):
        sim = features[start:start + chunk_size] @ bank.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(
    features: torch.Tensor,
    labels: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """Top-1 accuracy (percent) of :func:`knn_predict` against ``labels``."""
    pred = knn_predict(features, bank, bank_labels, num_classes, k, temperature)
    return 100.0 * (pred == labels.long()).float().mean().item()
