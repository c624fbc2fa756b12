"""``metrics.jsonl`` (logger ``jsonl``): one JSON object per epoch, the whole record, flushed as it is written.

On resume, lines of epochs after the checkpoint are dropped so the file never holds an epoch twice
(:class:`~contrastlab.observers.metrics_log.MetricsLog`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from contrastlab.observers.base import Run
from contrastlab.observers.loggers.base import Logger
from contrastlab.observers.metrics_log import MetricsLog
from contrastlab.registry import register_logger


class JSONLinesLogger(Logger):
    """Writes every epoch's record to ``<run>/metrics.jsonl``; per-step scalars are not kept."""

    def __init__(self, log: MetricsLog) -> None:
        self.file = log

    def on_start(self, run: Run) -> None:
        self.file.truncate_after(run.epoch)  # a fresh run (epoch 0) starts an empty file

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def on_epoch_end(self, run: Run, record: dict[str, Any]) -> None:
        self.file.write(record)


@register_logger("jsonl")
def jsonl_logger(run: Run) -> JSONLinesLogger:
    return JSONLinesLogger(MetricsLog(run.out / "metrics.jsonl"))
