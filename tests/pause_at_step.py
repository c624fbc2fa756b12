"""A plug-in observer for fault tests: it holds each rank after step ``PAUSE_STEP`` (default 3) of a run's first
attempt, writes ``rank<N>.pid`` in ``PAUSE_DIR`` and waits there until the test creates ``PAUSE_DIR/release``.

A test that kills or signals a training process mid-run uses it instead of racing a fast machine: once the pid files
are there, the checkpoint of step ``PAUSE_STEP - 1`` (with ``train.checkpoint_every_steps=2``) is on disk and the
run cannot finish before the test acts. Listed as ``plugins=[<this file>]`` and ``observers=[..., pause_at_step]``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import contrastlab


class PauseAtStep(contrastlab.Observer):
    def on_step_end(self, run, step_output) -> None:
        if run.step != int(os.environ.get("PAUSE_STEP", "3")) or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return
        here = Path(os.environ["PAUSE_DIR"])
        if (here / "release").exists():  # a resumed run of the same directory passes through
            return
        (here / f"rank{run.rank}.pid.tmp").write_text(str(os.getpid()))
        (here / f"rank{run.rank}.pid.tmp").rename(here / f"rank{run.rank}.pid")
        deadline = time.monotonic() + 120
        while not (here / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.02)


contrastlab.register_observer("pause_at_step")(PauseAtStep)
