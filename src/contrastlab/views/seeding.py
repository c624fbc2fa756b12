"""Per-worker seeding of the non-torch RNGs used while rendering views.

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
