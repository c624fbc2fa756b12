"""Seeding of the RNGs used while rendering views: per sample (:func:`sample_seed`) or per worker.

:func:`sample_seed` gives every ``(run seed, epoch, dataset index)`` its own stream, so the views of an
image depend neither on which worker renders it nor on what that worker rendered before: a run is the same
with any number of workers, and a run resumed in the middle of an epoch renders the rest of the epoch
exactly as the uninterrupted run (``ViewDataset(seed=...)``).

``DataLoader`` seeds torch in each worker with ``base_seed + worker_id``, but not Python's ``random`` or
NumPy, which would otherwise repeat across workers (forked) or depend on the process. :func:`seed_worker`
derives both from ``torch.initial_seed()``, so a run with a seeded ``DataLoader(generator=...)`` is
reproducible end to end.

Example:
    >>> loader = torch.utils.data.DataLoader(  # doctest: +SKIP
    ...     dataset, num_workers=4, worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` for ``DataLoader``: seed ``random`` and NumPy from this worker's torch seed.

    Args:
        worker_id: The worker's index (unused: torch's per-worker seed already includes it).
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed of its own for sample ``index`` in ``epoch`` of a run seeded with ``seed`` (SplitMix64 mixing)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % 2**64
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = ((x ^ (x >> shift)) * mult) % 2**64
    return (x ^ (x >> 31)) % 2**63
