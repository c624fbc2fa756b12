"""The batches of an epoch: which dataset indices each rank trains on, a pure function of ``(seed, rank, epoch)``.

Being an explicit list, an epoch can be resumed at any batch (the trainer skips the batches already trained).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DistributedSampler

from contrastlab.config.derived import Derived
from contrastlab.config.schema import Config
from contrastlab.data.samplers import MPerClassSampler
from contrastlab.engine.seeding import epoch_seed


def epoch_batches(targets: Sequence[int] | None, num_samples: int, cfg: Config, d: Derived, rank: int,
                  epoch: int) -> list[list[int]]:
    """This rank's batches of dataset indices for ``epoch``, a pure function of ``(seed, epoch, rank)``.

    ``random``: a permutation per epoch (one process: ``torch.randperm`` seeded per ``(seed, rank, epoch)``,
    as ``RandomSampler``; several ranks: ``DistributedSampler``'s split of a permutation seeded by
    ``seed + epoch``); ``m_per_class``: :class:`~contrastlab.data.samplers.MPerClassSampler`. Only whole
    batches are kept, ``d.steps_per_epoch`` of them.
    """
    if cfg.data.sampler == "m_per_class":  # every rank draws the same global batches and keeps its slice
        sampler = MPerClassSampler(targets, m=cfg.data.samples_per_class, batch_size=d.global_batch_size,
                                   length_before_new_iter=cfg.data.epoch_length or None, seed=cfg.seed,
                                   num_replicas=d.world_size, rank=rank)
        sampler.set_epoch(epoch)
        return list(sampler)[: d.steps_per_epoch]
    if d.world_size > 1:
        dist_sampler = DistributedSampler(range(num_samples), num_replicas=d.world_size, rank=rank, shuffle=True,
                                          seed=cfg.seed, drop_last=True)
        dist_sampler.set_epoch(epoch)
        order = list(dist_sampler)
    else:
        g = torch.Generator().manual_seed(epoch_seed(cfg.seed, rank, epoch))
        order = torch.randperm(num_samples, generator=g).tolist()
    b = d.per_rank_batch_size
    return [order[i * b:(i + 1) * b] for i in range(min(d.steps_per_epoch, len(order) // b))]
