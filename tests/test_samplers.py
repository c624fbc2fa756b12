"""The m-per-class batch sampler and its helpers, checked by counting (never against printed values)."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from contrastlab.data import ClassIndex, MPerClassSampler
from contrastlab.data.samplers import draw_positions
from contrastlab.errors import ConfigError


def _cifar100_labels(seed: int = 0) -> torch.Tensor:
    """CIFAR-100-sized fake labels: 100 classes x 500 images, in a shuffled order."""
    labels = torch.arange(100).repeat_interleave(500)
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))]


def test_cifar_defaults_give_390_batches_of_64_classes_times_2() -> None:
    labels = _cifar100_labels()
    sampler = MPerClassSampler(labels.tolist(), m=2, batch_size=128)
    assert len(sampler) == 390
    assert sampler.list_size == 49_920
    batches = sampler.global_batches()
    assert batches.shape == (390, 128)
    assert int(batches.min()) >= 0 and int(batches.max()) < labels.numel()
    batch_labels = labels[batches]  # [390, 128]
    # Consecutive pairs are one class group, and the 64 groups of a batch are 64 distinct classes.
    groups = batch_labels.view(390, 64, 2)
    assert bool((groups[..., 0] == groups[..., 1]).all())
    for row in groups[..., 0]:
        assert row.unique().numel() == 64
    # Every selected class appears exactly m = 2 times.
    for row in batch_labels:
        assert set(Counter(row.tolist()).values()) == {2}
    # No image is repeated inside a class (the classes are distinct, so: no image repeated at all).
    for row in batches:
        assert row.unique().numel() == 128
    # Exactly one positive per anchor: one other position in the batch with the same label.
    same = batch_labels[:, :, None] == batch_labels[:, None, :]
    positives = same.sum(dim=2) - 1
    assert bool((positives == 1).all())


def test_iteration_yields_lists_of_the_global_batches() -> None:
    labels = _cifar100_labels(1)
    sampler = MPerClassSampler(labels, m=2, batch_size=128, seed=3)
    sampler.set_epoch(5)
    batches = list(sampler)
    assert len(batches) == 390 and all(isinstance(b, list) and len(b) == 128 for b in batches)
    assert torch.equal(torch.tensor(batches), sampler.global_batches())


def test_classes_are_drawn_uniformly_over_an_epoch() -> None:
    labels = _cifar100_labels(2)
    sampler = MPerClassSampler(labels, m=2, batch_size=128)
    counts = torch.bincount(labels[sampler.global_batches()].view(-1), minlength=100) // 2
    # Each batch picks 64 of 100 classes: per class Binomial(390, 0.64), mean 249.6, sd about 9.5.
    assert int(counts.sum()) == 390 * 64
    assert int(counts.min()) > 249.6 - 6 * 9.5 and int(counts.max()) < 249.6 + 6 * 9.5


def test_images_inside_a_class_are_drawn_uniformly() -> None:
    labels = torch.arange(4).repeat_interleave(5)  # 4 classes x 5 images
    sampler = MPerClassSampler(labels, m=2, batch_size=8, length_before_new_iter=8 * 4000)
    batches = sampler.global_batches()
    counts = torch.bincount(batches.view(-1), minlength=20)
    # Every batch holds all 4 classes, 2 distinct images of 5 each: every image 4000 * 2/5 = 1600 times.
    assert int(counts.sum()) == 8 * 4000
    assert bool(((counts - 1600).abs() < 160).all())


def test_deterministic_per_seed_and_epoch() -> None:
    labels = _cifar100_labels(3)
    a = MPerClassSampler(labels, seed=11)
    b = MPerClassSampler(labels, seed=11)
    a.set_epoch(4)
    b.set_epoch(4)
    assert torch.equal(a.global_batches(), b.global_batches())
    assert list(a) == list(a)  # iterating twice in an epoch repeats it
    b.set_epoch(5)
    assert not torch.equal(a.global_batches(), b.global_batches())
    c = MPerClassSampler(labels, seed=12)
    c.set_epoch(4)
    assert not torch.equal(a.global_batches(), c.global_batches())


def test_length_before_new_iter_is_trimmed_to_whole_batches() -> None:
    labels = _cifar100_labels(4)
    sampler = MPerClassSampler(labels, m=2, batch_size=128, length_before_new_iter=1000)
    assert len(sampler) == 7 and sampler.list_size == 896
    assert len(list(sampler)) == 7


def test_small_classes_are_sampled_with_replacement() -> None:
    # Class 0 has one image, class 1 has two, class 2 has six.
    labels = [0, 1, 1, 2, 2, 2, 2, 2, 2]
    sampler = MPerClassSampler(labels, m=3, batch_size=9, length_before_new_iter=9 * 50)
    for batch in sampler:
        groups = [batch[i : i + 3] for i in range(0, 9, 3)]
        by_class = {labels[g[0]]: g for g in groups}
        assert set(by_class) == {0, 1, 2}
        assert all(labels[i] == c for c, g in by_class.items() for i in g)
        assert by_class[0] == [0, 0, 0]
        assert set(by_class[1]) <= {1, 2}
        assert len(set(by_class[2])) == 3  # six images >= m: without replacement


def test_distributed_split_keeps_class_groups_on_each_rank() -> None:
    labels = _cifar100_labels(5)
    single = MPerClassSampler(labels, m=2, batch_size=128, seed=7)
    ranks = [MPerClassSampler(labels, m=2, batch_size=128, seed=7, num_replicas=2, rank=r) for r in range(2)]
    for s in [single, *ranks]:
        s.set_epoch(2)
    assert all(len(r) == len(single) == 390 for r in ranks)
    for global_batch, *local in zip(single, *ranks):
        assert all(len(b) == 64 for b in local)
        assert local[0] + local[1] == global_batch  # rank order gives back the global batch
        for b in local:
            lab = labels[torch.tensor(b)]
            # 32 whole class groups of 2 on each rank: every anchor's positive is on its own rank.
            assert set(Counter(lab.tolist()).values()) == {2}
            assert bool(((lab[:, None] == lab[None, :]).sum(dim=1) == 2).all())
        assert not set(labels[torch.tensor(local[0])].tolist()) & set(labels[torch.tensor(local[1])].tolist())


def test_works_as_a_dataloader_batch_sampler() -> None:
    labels = torch.arange(10).repeat_interleave(4)
    dataset = TensorDataset(torch.arange(40), labels)
    loader = DataLoader(dataset, batch_sampler=MPerClassSampler(labels, m=2, batch_size=8))
    batches = list(loader)
    assert len(batches) == 5
    for index, lab in batches:
        assert index.shape == (8,) and torch.equal(labels[index], lab)
        assert bool((lab.view(4, 2)[:, 0] == lab.view(4, 2)[:, 1]).all())


def test_rejects_bad_configurations_naming_the_values() -> None:
    labels = torch.arange(10).repeat_interleave(4)
    with pytest.raises(ConfigError, match=r"batch_size=10.*m=3"):
        MPerClassSampler(labels, m=3, batch_size=10)
    with pytest.raises(ConfigError, match=r"32.*only 10 classes"):
        MPerClassSampler(labels, m=2, batch_size=64)
    with pytest.raises(ConfigError, match="num_replicas=4"):
        MPerClassSampler(labels, m=2, batch_size=12, num_replicas=4)
    with pytest.raises(ConfigError, match="length_before_new_iter"):
        MPerClassSampler(labels, m=2, batch_size=8, length_before_new_iter=4)
    with pytest.raises(ConfigError, match="unlabeled"):
        MPerClassSampler([0, 0, 1, -1], m=2, batch_size=2)
    with pytest.raises(ConfigError):
        MPerClassSampler(labels, m=2, batch_size=8, num_replicas=2, rank=2)


def test_draw_positions_distinct_and_uniform_over_subsets() -> None:
    g = torch.Generator().manual_seed(0)
    rows = 20_000
    pos = draw_positions(torch.full((rows,), 5), 2, g)
    assert bool((pos[:, 0] != pos[:, 1]).all()) and int(pos.min()) >= 0 and int(pos.max()) <= 4
    subsets = Counter(tuple(sorted(p)) for p in pos.tolist())
    assert set(subsets) == set(itertools.combinations(range(5), 2))
    assert all(abs(c - rows / 10) < 0.1 * rows / 10 for c in subsets.values())
    # k == size: a permutation of every row.
    full = draw_positions(torch.tensor([4, 4, 4]), 4, g)
    assert all(sorted(r) == [0, 1, 2, 3] for r in full.tolist())


def test_class_index_groups_and_from_groups() -> None:
    labels = [2, 0, 2, 1, 0, 2]
    index = ClassIndex(labels)
    assert index.classes.tolist() == [0, 1, 2] and index.counts.tolist() == [2, 1, 3]
    assert index.indices_of(2).tolist() == [0, 2, 5]
    assert index.indices_of(0).tolist() == [1, 4]
    grouped = ClassIndex.from_groups({7: [10, 12], 3: [11]})
    assert grouped.classes.tolist() == [3, 7]
    assert grouped.indices_of(7).tolist() == [10, 12] and grouped.indices_of(3).tolist() == [11]
    with pytest.raises(ValueError):
        index.class_positions(torch.tensor([5]))
    with pytest.raises(ConfigError):
        ClassIndex.from_groups([[0, 1], [1]])
