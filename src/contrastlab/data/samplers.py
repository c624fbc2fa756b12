"""Label-aware index sampling: the m-per-class batch sampler and dataset indices grouped by class.

:class:`MPerClassSampler` builds the batches of supervised in-batch Mutual Contrastive Learning (Yang et
al., AAAI 2022, upstream ``dataset/class_sampler.py``, itself after pytorch-metric-learning): every batch
holds ``batch_size / m`` distinct classes with ``m`` images each, so every anchor has ``m - 1``
in-batch positives. :class:`ClassIndex` groups dataset indices by label; it also serves the memory-bank
index sampling of :func:`~contrastlab.memory.sample_contrast_indices`. :func:`draw_positions` draws
distinct positions per row with Floyd's algorithm, which costs ``O(k^2)`` per row whatever the class size.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from contrastlab.errors import ConfigError

__all__ = ["ClassIndex", "MPerClassSampler", "draw_positions"]


def draw_positions(sizes: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``k`` positions in ``range(sizes[r])`` for every row ``r``.

    A row with ``sizes[r] >= k`` gets ``k`` distinct positions, a uniformly random ``k``-subset (Robert
    Floyd's algorithm: for ``j = n - k .. n - 1`` draw ``t`` uniform in ``0..j`` and take ``t``, or ``j``
    when ``t`` was already taken). A row with ``0 < sizes[r] < k`` gets ``k`` positions drawn with
    replacement.

    Args:
        sizes: ``[R]`` positive integers.
        k: positions per row.
        generator: source of randomness (CPU).

    Returns:
        ``[R, k]`` ``long`` on the CPU.

    Example:
        >>> pos = draw_positions(torch.tensor([500, 500, 1]), 2, torch.Generator().manual_seed(0))
        >>> bool(pos[0, 0] != pos[0, 1]), pos[2].tolist()
        (True, [0, 0])
    """
    sizes = torch.as_tensor(sizes, dtype=torch.long).cpu().flatten()
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if sizes.numel() and int(sizes.min()) < 1:
        raise ValueError("every size must be at least 1")
    rows = sizes.numel()
    out = torch.empty(rows, k, dtype=torch.long)
    uniform = torch.rand(rows, k, generator=generator, dtype=torch.float64)
    for step in range(k):
        upper = sizes - k + step  # Floyd's j; negative for rows drawn with replacement
        t = torch.minimum((uniform[:, step] * (upper + 1)).long(), upper)
        taken = (out[:, :step] == t[:, None]).any(dim=1)
        out[:, step] = torch.where(taken, upper, t)
    small = sizes < k
    if bool(small.any()):
        out[small] = torch.minimum((uniform[small] * sizes[small, None]).long(), sizes[small, None] - 1)
    return out


class ClassIndex:
    """Dataset indices grouped by label: one sorted index table, offsets and counts per class.

    Args:
        labels: one integer label per dataset index (a list, an array or a tensor).

    Attributes:
        classes: ``[C]`` the distinct labels, sorted.
        counts: ``[C]`` number of indices of each class.
        offsets: ``[C]`` where each class starts in :attr:`order`.
        order: ``[N]`` dataset indices grouped by class (ascending labels, then ascending indices).

    Example:
        >>> index = ClassIndex([1, 0, 1, 2])
        >>> index.indices_of(1).tolist()
        [0, 2]
    """

    def __init__(self, labels: Sequence[int] | np.ndarray | torch.Tensor) -> None:
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
        labels_np = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels_np.size == 0:
            raise ConfigError("ClassIndex needs at least one label, got none")
        classes, counts = np.unique(labels_np, return_counts=True)  # sorted
        self.order = torch.from_numpy(np.argsort(labels_np, kind="stable"))
        self.classes = torch.from_numpy(classes)
        self.counts = torch.from_numpy(counts.astype(np.int64))
        self.offsets = torch.cumsum(self.counts, dim=0) - self.counts

    @classmethod
    def from_groups(
        cls, class_to_indices: Mapping[int, Sequence[int]] | Sequence[Sequence[int]]
    ) -> ClassIndex:
        """Build from ``{label: dataset indices}`` (or a list whose entry ``c`` lists class ``c``'s indices).

        Empty groups are dropped; an index must not appear in two groups.
        """
        if isinstance(class_to_indices, Mapping):
            groups = list(class_to_indices.items())
        else:
            groups = list(enumerate(class_to_indices))
        indices: list[int] = []
        labels: list[int] = []
        for label, members in groups:
            members = [int(i) for i in members]
            indices.extend(members)
            labels.extend([int(label)] * len(members))
        if len(set(indices)) != len(indices):
            raise ConfigError("class_to_indices lists some dataset index under more than one class")
        grouped = cls(labels)
        grouped.order = torch.as_tensor(indices, dtype=torch.long)[grouped.order]
        return grouped

    @property
    def num_samples(self) -> int:
        """Total number of indices."""
        return self.order.numel()

    @property
    def num_classes(self) -> int:
        """Number of distinct labels."""
        return self.classes.numel()

    def class_positions(self, labels: torch.Tensor) -> torch.Tensor:
        """Row of each label in :attr:`classes`; ``ValueError`` for a label that has no index."""
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        pos = torch.searchsorted(self.classes, labels).clamp(max=self.num_classes - 1)
        unknown = self.classes[pos] != labels
        if bool(unknown.any()):
            raise ValueError(f"label(s) {sorted(set(labels[unknown].tolist()))} have no dataset index")
        return pos

    def indices_of(self, label: int) -> torch.Tensor:
        """The dataset indices of class ``label``, ascending."""
        c = int(self.class_positions(torch.tensor([label]))[0])
        start = int(self.offsets[c])
        return self.order[start : start + int(self.counts[c])]


class MPerClassSampler(Sampler[list[int]]):
    """Batches of ``batch_size / m`` random classes times ``m`` random images of each (MCL, in-batch).

    Yang, An, Cai, Xu, "Mutual Contrastive Learning for Visual Representation Learning", AAAI 2022
    (upstream ``dataset/class_sampler.py``).

    This is a **batch sampler**: pass it as ``DataLoader(dataset, batch_sampler=sampler)`` (no
    ``batch_size``, ``shuffle`` or ``sampler``). Each item it yields is one batch, a list of dataset
    indices. For every global batch, ``batch_size / m`` distinct classes are drawn uniformly without
    replacement; inside each class, ``m`` images are drawn without replacement when the class has at
    least ``m`` images and with replacement otherwise. The ``m`` images of a class are consecutive.
    An epoch is ``length_before_new_iter`` indices trimmed down to a multiple of ``batch_size``
    (CIFAR-100 train with the defaults: 50,000 -> 49,920 indices, 390 batches), so an epoch is *not*
    a permutation of the dataset.

    **Distributed split.** ``batch_size`` is the *global* batch. Every rank draws the same global
    batches from ``(seed, epoch)`` (give every rank the same ``seed``), and rank ``r`` of ``W`` takes
    the contiguous slice ``[r * batch_size / W, (r + 1) * batch_size / W)`` of each global batch:
    ``batch_size / (m W)`` whole class groups. Every anchor therefore keeps its positives on its own
    rank, and concatenating the ranks' batches in rank order (what
    :func:`~contrastlab.engine.distributed.gather_with_grad` does) gives back the single-process batch.
    ``batch_size / m`` must be a multiple of ``W``.

    Randomness comes from a ``torch.Generator`` seeded with ``seed + epoch``; call :meth:`set_epoch`
    before each epoch (as with ``DistributedSampler``). Iterating twice in the same epoch gives the
    same batches.

    Args:
        labels: one integer label per dataset index (``dataset.targets``); unlabeled samples (``-1``)
            are not allowed.
        m: images per class in a batch (2).
        batch_size: the global batch size (128), a multiple of ``m``.
        length_before_new_iter: indices per epoch before trimming; ``len(labels)`` by default.
        seed: base seed, the same on every rank.
        num_replicas: number of ranks ``W``.
        rank: this rank.

    Raises:
        ConfigError: when ``batch_size`` is not a multiple of ``m``, when there are fewer classes than
            ``batch_size / m``, when ``batch_size / m`` is not a multiple of ``num_replicas``, when
            ``length_before_new_iter < batch_size``, or for an unlabeled sample.

    Example:
        >>> labels = [c for c in range(100) for _ in range(500)]  # CIFAR-100 train
        >>> sampler = MPerClassSampler(labels, m=2, batch_size=128)
        >>> sampler.set_epoch(0)
        >>> len(sampler), len(next(iter(sampler)))
        (390, 128)
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        m: int = 2,
        batch_size: int = 128,
        length_before_new_iter: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        m, batch_size = int(m), int(batch_size)
        if m < 1 or batch_size < 1:
            raise ConfigError(f"MPerClassSampler needs m >= 1 and batch_size >= 1, got m={m}, "
                              f"batch_size={batch_size}")
        if batch_size % m != 0:
            raise ConfigError(f"batch_size={batch_size} is not a multiple of m={m} (images per class)")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ConfigError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got "
                              f"num_replicas={num_replicas}, rank={rank}")
        self.index = ClassIndex(labels)
        if int(self.index.classes[0]) < 0:
            raise ConfigError("MPerClassSampler needs labelled samples; labels contain -1 (unlabeled)")
        classes_per_batch = batch_size // m
        if self.index.num_classes < classes_per_batch:
            raise ConfigError(
                f"batch_size={batch_size} with m={m} needs {classes_per_batch} distinct classes per batch, "
                f"but the labels have only {self.index.num_classes} classes"
            )
        if classes_per_batch % num_replicas != 0:
            raise ConfigError(
                f"batch_size={batch_size} / m={m} = {classes_per_batch} class groups per batch cannot be "
                f"split evenly over num_replicas={num_replicas} ranks"
            )
        length = self.index.num_samples if length_before_new_iter is None else int(length_before_new_iter)
        if length < batch_size:
            raise ConfigError(f"length_before_new_iter={length} is smaller than batch_size={batch_size}")
        self.m = m
        self.batch_size = batch_size
        self.classes_per_batch = classes_per_batch
        self.num_batches = length // batch_size
        self.seed = int(seed)
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    @property
    def list_size(self) -> int:
        """Indices per epoch over all ranks: ``len(self) * batch_size``."""
        return self.num_batches * self.batch_size

    @property
    def local_batch_size(self) -> int:
        """Indices per batch on this rank: ``batch_size / num_replicas``."""
        return self.batch_size // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields."""
        self.epoch = int(epoch)

    def global_batches(self) -> torch.Tensor:
        """All global batches of the current epoch, ``[len(self), batch_size]`` dataset indices."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        num_classes = self.index.num_classes
        # A uniformly random ordered choice of classes per batch: the first columns of a random permutation.
        keys = torch.rand(self.num_batches, num_classes, generator=generator, dtype=torch.float64)
        chosen = torch.argsort(keys, dim=1)[:, : self.classes_per_batch].reshape(-1)  # [nb * cpb]
        positions = draw_positions(self.index.counts[chosen], self.m, generator)  # [nb * cpb, m]
        slots = self.index.offsets[chosen, None] + positions
        return self.index.order[slots].reshape(self.num_batches, self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        start = self.rank * self.local_batch_size
        for batch in self.global_batches():
            yield batch[start : start + self.local_batch_size].tolist()

    def __len__(self) -> int:
        return self.num_batches
