"""``metrics.jsonl``: one JSON object per epoch, flushed as it is written.

Each line holds at least ``epoch``, ``step``, ``loss``, ``lr`` and ``img_per_s``, plus ``knn_top1``
on epochs where the kNN monitor ran. On resume, lines of epochs after the checkpoint are dropped so
the log never holds duplicated epochs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSON-lines log of per-epoch metrics."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def truncate_after(self, epoch: int) -> None:
        """Keep only the records of epochs ``<= epoch`` (used when resuming)."""
        kept = [r for r in self.read() if r.get("epoch", 0) <= epoch]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it to disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[dict[str, Any]]:
        """All records so far (empty when the file does not exist)."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
