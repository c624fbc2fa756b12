"""Where one rank stands inside the current epoch: batches done, loss sums, skipped steps (saved mid-epoch).

Step losses stay on the device until :meth:`EpochProgress.flush` reads every pending one in a single host read;
the sums are added step by step in float64, so they do not depend on when flushes happen (a resumed run sums
exactly as the uninterrupted one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from contrastlab.engine import distributed as dist


@dataclass
class EpochProgress:
    """Where one rank stands inside the current epoch: saved in mid-epoch checkpoints (every field but ``pending``)."""

    batch: int = 0  #: batches of this epoch already trained
    loss_sum: float = 0.0
    loss_count: int = 0
    skipped: int = 0  #: steps skipped for a non-finite loss or gradient (train.nonfinite=skip)
    part_sums: dict[str, float] = field(default_factory=dict)
    pending: list[tuple[torch.Tensor, dict[str, Any]]] = field(default_factory=list, repr=False, compare=False)

    def saved(self) -> dict[str, Any]:
        """The fields a mid-epoch checkpoint keeps (call :meth:`flush` first)."""
        return {"batch": self.batch, "loss_sum": self.loss_sum, "loss_count": self.loss_count,
                "skipped": self.skipped, "part_sums": dict(self.part_sums)}

    def add(self, loss: torch.Tensor, parts: dict[str, Any]) -> None:
        """Keep a step's loss and loss parts (device tensors) until the next :meth:`flush`."""
        self.pending.append((loss.detach(), dict(parts)))

    def flush(self) -> float:
        """Add the pending losses and parts to the sums (one host read); the newest loss, or nan if none pending."""
        if not self.pending:
            return math.nan
        rows = [torch.stack([loss.double().reshape(()), *(torch.as_tensor(v, dtype=torch.float64, device=loss.device)
                                                         .reshape(()) for v in parts.values())])
                for loss, parts in self.pending]
        flat = torch.cat(rows).tolist()  # the one host read
        offset = 0
        for row, (_, parts) in zip(rows, self.pending):
            values = flat[offset:offset + row.numel()]
            offset += row.numel()
            self.loss_sum += values[0]
            self.loss_count += 1
            for key, value in zip(parts, values[1:]):
                self.part_sums[key] = self.part_sums.get(key, 0.0) + value
        self.pending.clear()
        return values[0]

    def means(self) -> dict[str, Any]:
        """The epoch's mean ``loss`` and, when the method reports them, mean ``parts``, averaged over the ranks."""
        count = max(1, self.loss_count)
        record: dict[str, Any] = {"loss": dist.all_reduce_mean(torch.tensor(self.loss_sum / count)).item()}
        if self.part_sums:
            record["parts"] = {k: dist.all_reduce_mean(torch.tensor(v / count)).item() for k, v in self.part_sums.items()}
        return record
