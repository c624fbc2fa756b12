"""A first-in first-out queue of key embeddings: MoCo's dictionary of negatives.

He, Fan, Wu, Xie, Girshick, "Momentum Contrast for Unsupervised Visual Representation Learning",
CVPR 2020, section 3.2.

Keys are gathered from every rank *before* they are written, so each rank holds the same queue and a
step adds ``world_size * B`` keys (the global batch), as in the reference implementation. The queue
size must be a multiple of the number of keys written per step, so a write never straddles the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contrastlab.engine.distributed import gather_no_grad
from contrastlab.errors import ConfigError

__all__ = ["FeatureQueue"]


class FeatureQueue(nn.Module):
    """Ring buffer of ``size`` unit vectors of dimension ``dim``.

    Args:
        dim: embedding dimension.
        size: number of stored keys (MoCo: 65536 on ImageNet, 4096 on CIFAR).
        seed: seed of the random unit vectors the queue starts with. A fixed seed gives every rank the
            same initial queue without any communication.

    Attributes:
        queue: ``[size, dim]`` buffer (saved in the state dict); row ``i`` is one key.
        ptr: scalar ``long`` buffer, the row the next write starts at.

    Example:
        >>> memory = FeatureQueue(dim=128, size=4096)
        >>> keys = F.normalize(torch.randn(256, 128), dim=1)
        >>> memory.enqueue(keys)
        >>> int(memory.ptr)
        256
    """

    queue: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, dim: int, size: int, seed: int = 0) -> None:
        super().__init__()
        if dim < 1 or size < 1:
            raise ConfigError(f"FeatureQueue needs dim >= 1 and size >= 1, got dim={dim}, size={size}")
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("queue", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        """Number of stored keys."""
        return self.queue.shape[0]

    @property
    def dim(self) -> int:
        """Dimension of a key."""
        return self.queue.shape[1]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, gather_distributed: bool = True) -> None:
        """Write ``keys [B, dim]`` (after gathering them from every rank) over the oldest entries.

        Args:
            keys: this rank's keys; they are detached.
            gather_distributed: gather the keys of all ranks first, so every rank writes the same
                global batch (rank 0's keys first). Without it each rank writes only its own keys and
                the queues of the ranks diverge.

        Raises:
            ConfigError: when the queue size is not a multiple of the number of keys written.
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be [B, {self.dim}], got {tuple(keys.shape)}")
        keys = keys.detach()
        if gather_distributed:
            keys = gather_no_grad(keys)
        count = keys.shape[0]
        if self.size % count != 0:
            raise ConfigError(
                f"queue size {self.size} is not a multiple of the {count} keys written per step "
                f"(global batch); choose a queue size divisible by {count}"
            )
        # Rows ptr .. ptr + count - 1 (mod size), computed on the device: no read of the pointer to the host.
        rows = (self.ptr + torch.arange(count, device=self.queue.device)) % self.size
        self.queue.index_copy_(0, rows, keys.to(self.queue.dtype))
        self.ptr.copy_((self.ptr + count) % self.size)
