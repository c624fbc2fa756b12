"""A plug-in observer for fault tests: it holds each rank after step ``PAUSE_STEP`` (default 3; a comma-separated
list holds at each) of a run, writes
``paused.rank<N>.pid`` in the run directory and waits there until the test creates ``<run directory>/release`` or
the process receives a preemption signal (SIGUSR1, or SIGTERM outside torchrun: the trainer's handler records it).

A test that kills, signals or requeues a training process mid-run uses it instead of racing a fast machine: once
the pid files are there, the checkpoint of the last multiple of ``train.checkpoint_every_steps`` before
``PAUSE_STEP`` is on disk and the run cannot finish before the test acts. A run that finds ``release`` (a resumed
or requeued one) passes through. Listed as ``plugins=[<this file>]`` and ``observers=[..., pause_at_step]``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import contrastlab


def _preemption_recorded() -> bool:
    """Whether the trainer's handler (``engine.preemption.PreemptionSignals``) has recorded a signal."""
    handler = signal.getsignal(signal.SIGUSR1)
    return bool(getattr(getattr(handler, "__self__", None), "requested", False))


class PauseAtStep(contrastlab.Observer):
    def on_step_end(self, run, step_output) -> None:
        release = run.out / "release"
        steps = {int(step) for step in os.environ.get("PAUSE_STEP", "3").split(",")}
        if run.step not in steps or release.exists():
            return
        pid = run.out / f"paused.rank{run.rank}.pid"
        Path(f"{pid}.tmp").write_text(str(os.getpid()))
        Path(f"{pid}.tmp").rename(pid)
        deadline = time.monotonic() + 120
        while not release.exists() and not _preemption_recorded() and time.monotonic() < deadline:
            time.sleep(0.02)


contrastlab.register_observer("pause_at_step")(PauseAtStep)
