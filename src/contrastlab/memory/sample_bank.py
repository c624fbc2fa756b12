"""Per-sample memory banks, one per peer, and their label-based index sampling (MCL on ImageNet).

Yang, An, Cai, Xu, "Mutual Contrastive Learning for Visual Representation Learning", AAAI 2022,
supervised ImageNet setting (upstream ``losses/imagenet_sup_mcl_loss.py`` and ``dataset/imagenet.py``,
a CRD-style ``ContrastMemory``; github.com/winycg/MCL).

Each peer ``m`` owns a bank ``M_m`` with one row per training image. A step samples, for every anchor
``a``, its own index, ``pos_k`` same-class indices and ``neg_k`` other-class indices
(:func:`sample_contrast_indices`), reads every peer's rows there (:meth:`SampleMemoryBank.gather`),
computes :func:`~contrastlab.objectives.memory_bank_mutual_loss`, and then writes the anchors' new
embeddings with a momentum update (:meth:`SampleMemoryBank.update`).

.. warning::
    The banks are dense: ``num_banks * num_samples * dim`` floats. At ImageNet size (1,281,167 images,
    ``dim = 128``, float32) that is about 656 MB **per peer**, on the device the bank lives on, plus the
    same again in every checkpoint. ``neg_k = 4096`` instead of 8192 halves the gathered rows per step
    (upstream reports about the same accuracy), not the bank.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from contrastlab.data.samplers import ClassIndex, draw_positions
from contrastlab.engine.distributed import gather_no_grad
from contrastlab.errors import ConfigError

__all__ = ["SampleMemoryBank", "sample_contrast_indices"]


class SampleMemoryBank(nn.Module):
    """``num_banks`` memory banks of ``num_samples`` rows of dimension ``dim``, momentum-updated.

    Every entry starts uniform in ``[-1/sqrt(dim/3), 1/sqrt(dim/3)]`` (about +-0.153 for ``dim = 128``;
    the rows then have an expected squared norm of 1, but are not unit vectors), drawn from a
    ``torch.Generator`` seeded with ``seed`` so that every rank starts from the same banks without any
    communication. Rows are unit vectors once they have been updated.

    Memory: ``4 * num_banks * num_samples * dim`` bytes in float32, about 656 MB per peer for ImageNet
    (1,281,167 x 128); see :attr:`nbytes`.

    Args:
        num_samples: rows per bank (the training set size).
        dim: embedding dimension (128).
        num_banks: number of peers ``M``, one bank each.
        momentum: weight of the old row in the update (``--nce_m``, 0.5).
        seed: seed of the initial values.

    Attributes:
        memory: ``[num_banks, num_samples, dim]`` buffer (saved in the state dict).

    Example:
        >>> bank = SampleMemoryBank(num_samples=1000, dim=128, num_banks=2)
        >>> idx = torch.tensor([[3, 7, 500], [4, 9, 12]])
        >>> bank.gather(0, idx).shape
        torch.Size([2, 3, 128])
        >>> bank.update(0, torch.tensor([3, 4]), torch.randn(2, 128))
        >>> round(float(bank.memory[0, 3].norm()), 4)
        1.0
    """

    memory: torch.Tensor

    def __init__(
        self, num_samples: int, dim: int = 128, num_banks: int = 2, momentum: float = 0.5, seed: int = 0
    ) -> None:
        super().__init__()
        if num_samples < 1 or dim < 1 or num_banks < 1:
            raise ConfigError(
                f"SampleMemoryBank needs num_samples, dim and num_banks >= 1, got num_samples={num_samples}, "
                f"dim={dim}, num_banks={num_banks}"
            )
        if not 0.0 <= momentum <= 1.0:
            raise ConfigError(f"SampleMemoryBank momentum must be in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        bound = 1.0 / math.sqrt(dim / 3)
        generator = torch.Generator().manual_seed(seed)
        init = torch.rand(num_banks, num_samples, dim, generator=generator).mul_(2 * bound).sub_(bound)
        self.register_buffer("memory", init)

    @property
    def num_banks(self) -> int:
        """Number of banks (peers)."""
        return self.memory.shape[0]

    @property
    def num_samples(self) -> int:
        """Rows per bank."""
        return self.memory.shape[1]

    @property
    def dim(self) -> int:
        """Dimension of a row."""
        return self.memory.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held by all banks."""
        return self.memory.numel() * self.memory.element_size()

    def _check_bank(self, bank_index: int) -> None:
        if not 0 <= bank_index < self.num_banks:
            raise IndexError(f"bank_index {bank_index} out of range for {self.num_banks} banks")

    def gather(self, bank_index: int, indices: torch.Tensor) -> torch.Tensor:
        """Rows of bank ``bank_index`` at ``indices`` (any shape ``[...]``), as a new ``[..., dim]`` tensor.

        The result carries no gradient (the bank is a buffer).
        """
        self._check_bank(bank_index)
        return self.memory[bank_index][indices.to(self.memory.device)]

    @torch.no_grad()
    def update(
        self,
        bank_index: int,
        sample_indices: torch.Tensor,
        embeddings: torch.Tensor,
        gather_distributed: bool = True,
    ) -> None:
        """Momentum update ``M[a] <- normalise(momentum * M[a] + (1 - momentum) * z_a)``, no gradient.

        ``z_a`` is L2-normalised first, as the loss normalises the anchors it scores (MCL's projection
        head already outputs unit vectors, so this changes nothing there). When an index occurs several
        times in one update, its last occurrence (in gathered order) is written, from the old row.

        Args:
            bank_index: which peer's bank.
            sample_indices: ``[B]`` dataset indices of this rank's anchors.
            embeddings: ``[B, dim]`` this rank's embeddings of those anchors; detached.
            gather_distributed: gather indices and embeddings from every rank first (rank 0's first),
                so every rank writes the same global batch and the banks stay identical. Without it,
                each rank writes only its own anchors and the banks of the ranks diverge.
        """
        self._check_bank(bank_index)
        sample_indices = sample_indices.reshape(-1).to(device=self.memory.device, dtype=torch.long)
        if embeddings.dim() != 2 or embeddings.shape != (sample_indices.numel(), self.dim):
            raise ValueError(
                f"embeddings must be [{sample_indices.numel()}, {self.dim}], got {tuple(embeddings.shape)}"
            )
        embeddings = embeddings.detach().to(self.memory.device)
        if gather_distributed:
            sample_indices = gather_no_grad(sample_indices)
            embeddings = gather_no_grad(embeddings)
        # Keep the last occurrence of every index (index_copy_ with duplicates is undefined).
        unique, inverse = torch.unique(sample_indices, return_inverse=True)
        positions = torch.arange(sample_indices.numel(), device=sample_indices.device)
        last = torch.full_like(unique, -1).scatter_reduce_(0, inverse, positions, reduce="amax")
        z = F.normalize(embeddings[last].to(self.memory.dtype), dim=1)
        bank = self.memory[bank_index]
        mixed = self.momentum * bank[unique] + (1.0 - self.momentum) * z
        bank.index_copy_(0, unique, F.normalize(mixed, dim=1))


def sample_contrast_indices(
    index: torch.Tensor,
    labels: torch.Tensor,
    class_to_indices: ClassIndex | Mapping[int, Sequence[int]] | Sequence[Sequence[int]],
    pos_k: int = 1,
    neg_k: int = 8192,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Memory-bank indices for each anchor: own index, same-class indices, other-class indices.

    Upstream ``ImageFolderSample.__getitem__`` (MCL, ImageNet): for anchor ``a`` of class ``y_a``,

    - column 0: ``a`` itself (the own slot);
    - columns ``1 .. pos_k``: ``pos_k`` indices of class ``y_a``, distinct when the class has at least
      ``pos_k`` images (with replacement otherwise); they may equal ``a``;
    - the last ``neg_k`` columns: indices drawn uniformly *with replacement* from all images of the
      other classes (so a negative never shares the anchor's label).

    Vectorised over the batch (upstream draws per image in the DataLoader workers).

    Args:
        index: ``[B]`` dataset indices of the anchors.
        labels: ``[B]`` their labels.
        class_to_indices: a :class:`~contrastlab.data.ClassIndex` (build it once from
            ``dataset.targets``), or ``{label: indices}``, or a list of index lists per label
            (converted on every call).
        pos_k: same-class indices per anchor (1).
        neg_k: other-class indices per anchor (8192; 4096 performs about the same upstream).
        generator: source of randomness (CPU).

    Returns:
        ``[B, 1 + pos_k + neg_k]`` ``long`` indices on ``index``'s device.

    Raises:
        ConfigError: for ``pos_k < 1`` or ``neg_k < 1``, or when there is only one class.

    Example:
        >>> from contrastlab.data import ClassIndex
        >>> labels = torch.arange(10).repeat(5)
        >>> idx = sample_contrast_indices(torch.tensor([0, 1]), labels[:2], ClassIndex(labels), neg_k=16)
        >>> idx.shape, idx[:, 0].tolist()
        (torch.Size([2, 18]), [0, 1])
    """
    if pos_k < 1 or neg_k < 1:
        raise ConfigError(f"sample_contrast_indices needs pos_k >= 1 and neg_k >= 1, got {pos_k}, {neg_k}")
    grouped = class_to_indices if isinstance(class_to_indices, ClassIndex) else ClassIndex.from_groups(
        class_to_indices
    )
    if grouped.num_classes < 2:
        raise ConfigError("sample_contrast_indices needs at least two classes to draw negatives from")
    index = index.reshape(-1)
    labels = labels.reshape(-1)
    if index.shape != labels.shape:
        raise ValueError(f"index and labels must have the same length, got {index.numel()} and "
                         f"{labels.numel()}")
    c = grouped.class_positions(labels)  # [B]
    counts, offsets = grouped.counts[c], grouped.offsets[c]
    positives = grouped.order[offsets[:, None] + draw_positions(counts, pos_k, generator)]  # [B, pos_k]
    # Uniform over the other classes: draw a slot among the N - n_c slots outside the class's block of
    # ``order`` and step over that block.
    others = grouped.num_samples - counts  # [B]
    uniform = torch.rand(index.numel(), neg_k, generator=generator, dtype=torch.float64)
    slot = torch.minimum((uniform * others[:, None]).long(), others[:, None] - 1)
    slot = slot + counts[:, None] * (slot >= offsets[:, None])
    negatives = grouped.order[slot]  # [B, neg_k]
    own = index.cpu().to(torch.long)[:, None]
    return torch.cat([own, positives, negatives], dim=1).to(index.device)
