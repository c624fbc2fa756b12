"""Preemption: turn SIGTERM / SIGUSR1 (what SLURM and most schedulers send before they stop a job) into a
request to checkpoint at the next step boundary and exit cleanly.

The trainer polls :attr:`PreemptionSignals.requested` after every step (agreeing across ranks), writes a
mid-epoch checkpoint and raises :class:`PreemptedError`; the command line then exits with status
:data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``: "try again later"), and a requeued job continues with
``resume=auto`` exactly where it stopped.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from contrastlab.errors import ContrastlabError

EXIT_PREEMPTED = 75
"""Exit status of a run stopped by a preemption signal after writing its checkpoint."""

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


class PreemptedError(ContrastlabError):
    """Training stopped on a preemption signal after checkpointing; resume with ``resume=auto``."""


class PreemptionSignals:
    """Context manager that records SIGTERM / SIGUSR1 instead of dying, and restores the old handlers.

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
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
