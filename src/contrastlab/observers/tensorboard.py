"""TensorBoard event files (``<run>/tensorboard``), written only when the package is installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TensorBoardLog:
    """Scalars per step and per epoch; a no-op when ``tensorboard`` is missing or ``enabled`` is False."""

    def __init__(self, folder: str | Path, enabled: bool = True) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a declared dependency, but stay usable without it
            return
        self.writer = SummaryWriter(log_dir=str(folder))

    def scalars(self, values: dict[str, Any], step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(prefix + name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
