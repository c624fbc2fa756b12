"""Console progress: step, loss, learning rate, images per second and ETA (observer ``progress``, rank 0).

The lines come every ``train.log_every`` steps and at the last step, from the trainer's ``train/loss`` and
``train/lr`` (:meth:`~contrastlab.observers.base.Run.log_metrics`): the loss is read from the device once for
the progress line and the epoch sums alike.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping

from contrastlab.observers.base import Observer, Run
from contrastlab.registry import register_observer


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1:02:05"``."""
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress(Observer):
    """Prints a progress line every ``every`` steps (a live bar when stderr is a terminal).

    Throughput counts images of the global batch per second of wall time since the last line.
    """

    def __init__(self, total_steps: int, global_batch: int, every: int = 20, enabled: bool = True) -> None:
        self.total_steps = total_steps
        self.global_batch = global_batch
        self.every = max(1, every)
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._t0 = time.perf_counter()
        self._last_t = self._t0
        self._last_step = 0
        self.img_per_s = 0.0

    def reset_clock(self, step: int) -> None:
        """Start timing from ``step`` (after a resume or an evaluation pause)."""
        self._last_t = time.perf_counter()
        self._last_step = step

    def update(self, step: int, epoch: int, loss: float, lr: float) -> None:
        """Report after optimiser step ``step`` (1-based count of steps done)."""
        if step % self.every and step != self.total_steps:
            return
        now = time.perf_counter()
        done = step - self._last_step
        if done > 0 and now > self._last_t:
            self.img_per_s = done * self.global_batch / (now - self._last_t)
        self._last_t, self._last_step = now, step
        if not self.enabled:
            return
        eta = (self.total_steps - step) * self.global_batch / self.img_per_s if self.img_per_s else 0.0
        pct = 100.0 * step / max(1, self.total_steps)
        line = (f"epoch {epoch} step {step}/{self.total_steps} ({pct:5.1f}%) loss {loss:.4f} "
                f"lr {lr:.4g} {self.img_per_s:,.0f} img/s eta {format_duration(eta)}")
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
            if step == self.total_steps:
                print(file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def on_epoch_start(self, run: Run) -> None:
        self.reset_clock(run.step)

    def on_log(self, run: Run, metrics: Mapping[str, float], step: int) -> None:
        if "train/loss" in metrics:
            self.update(step, run.epoch + 1, metrics["train/loss"], metrics.get("train/lr", run.lr))


@register_observer("progress")
def progress_observer(run: Run) -> Progress | None:
    """``progress``: on rank 0 unless the run is quiet."""
    if not run.is_main or run.quiet:
        return None
    d = run.derived
    return Progress(d.total_steps, d.global_batch_size, run.config.train.log_every)
