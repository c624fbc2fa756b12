"""Preemption: turn SIGTERM / SIGUSR1 (what SLURM and most schedulers send before they stop a job) into a
request to checkpoint at the next step boundary and exit cleanly. Under ``torchrun`` only SIGUSR1 does
(``#SBATCH --signal=USR1@120`` with SLURM): torchrun uses SIGTERM to stop the workers of a failed group.

The trainer polls :attr:`PreemptionSignals.requested` after every step (agreeing across ranks), writes a
mid-epoch checkpoint and raises :class:`PreemptedError`; the command line then exits with status
:data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``: "try again later"), and a requeued job continues with
``resume=auto`` exactly where it stopped.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

from contrastlab.errors import ContrastlabError

EXIT_PREEMPTED = 75
"""Exit status of a run stopped by a preemption signal after writing its checkpoint."""

def preemption_signals() -> tuple[int, ...]:
    """SIGTERM and SIGUSR1; under ``torchrun`` only SIGUSR1, because torchrun's agent stops its workers with
    SIGTERM when a peer fails (and then restarts them), and a worker must then die, not finish the epoch."""
    names = ("SIGUSR1",) if "TORCHELASTIC_RUN_ID" in os.environ else ("SIGTERM", "SIGUSR1")
    return tuple(getattr(signal, name) for name in names if hasattr(signal, name))


class PreemptedError(ContrastlabError):
    """Training stopped on a preemption signal after checkpointing; resume with ``resume=auto``."""


class PreemptionSignals:
    """Context manager that records SIGTERM / SIGUSR1 instead of dying, and restores the old handlers.

    Once a signal has been recorded, a signal whose old handler was the default (which ends the process) is ignored
    from then on instead: the process is being stopped by it, and SLURM sends it to every process of a job step while
    a study's cell runner passes it on too, so a second copy could otherwise end the process after the checkpoint but
    before it reports it and exits with :data:`EXIT_PREEMPTED`.

    Outside the main thread (where Python cannot install handlers) it records nothing.

    Example:
        >>> with PreemptionSignals() as signals:
        ...     signals.requested
        False
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> PreemptionSignals:  # noqa: PYI034 (typing.Self needs Python 3.11)
        if threading.current_thread() is threading.main_thread():
            for sig in preemption_signals():
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            if self.requested and handler == signal.SIG_DFL:
                handler = signal.SIG_IGN
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
