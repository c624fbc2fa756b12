"""TensorBoard event files in ``<run>/tensorboard`` (logger ``tensorboard``).

Tags: ``train/loss`` and ``train/lr`` at the step count; ``epoch/<key>``, ``parts/<term>``, ``test_top1/<head>``
at the epoch number. TensorBoard is a dependency of contrastlab; without it the logger writes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

from contrastlab.observers.base import Run
from contrastlab.observers.loggers.base import Logger
from contrastlab.registry import register_logger


class TensorBoardLogger(Logger):
    """Scalars to a ``SummaryWriter`` opened when training starts."""

    def __init__(self) -> None:
        self.writer = None

    def on_start(self, run: Run) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # a declared dependency, but stay usable without it
            return
        self.writer = SummaryWriter(log_dir=str(run.out / "tensorboard"))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in metrics.items():
                self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@register_logger("tensorboard")
def tensorboard_logger(run: Run) -> TensorBoardLogger:
    return TensorBoardLogger()
