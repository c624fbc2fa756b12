"""One run directory, one trainer: a lock file held for the whole life of a run.

Two trainers writing the same ``out`` directory would interleave ``metrics.jsonl`` and overwrite each other's
``last.pt`` (a double launch, or a cluster requeueing a job whose first copy is still alive). The trainer's
rank 0 therefore takes ``<out>/run.lock`` before it reads or writes anything there, and releases it when the
run ends, however it ends. The file is JSON: the holder's host, pid, start time and a heartbeat (a time the
holder refreshes from a background thread every ``timeout / 5`` seconds).

A second trainer finds the file and:

- fails at once (:class:`RunLockedError`, naming the holder and what to do) when the holder is alive: on the
  same host its pid exists (and is the same process, by its start time in ``/proc``); on another host its
  heartbeat is younger than ``timeout`` seconds (``train.lock_timeout``);
- takes the lock over, with a log line, when the holder is gone: on the same host its pid no longer exists
  (killed, crashed, a node's agent restarted it); on another host it stopped refreshing the heartbeat more
  than ``timeout`` seconds ago. So a requeued job resumes by itself once its first copy is gone.

Creating and taking over are atomic (a complete temporary file linked or renamed into place), and decided
under an advisory ``flock`` on the directory, so two trainers started at the same moment cannot both win.
The heartbeat compares clocks of different hosts: keep them synchronised (NTP) and the timeout well above
their skew. A process only ever deletes a lock file that still holds its own token.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder, RunLock(folder) as lock:
    ...     lock.path.name
    'run.lock'
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from contrastlab.errors import ContrastlabError

LOCK_NAME = "run.lock"
"""File name of the lock inside a run directory."""

DEFAULT_TIMEOUT = 300.0
"""Seconds without a heartbeat after which a holder on another host counts as gone (``train.lock_timeout``)."""


class RunLockedError(ContrastlabError):
    """Another live trainer holds the run directory."""


def _process_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), None if unknown.

    With the pid it identifies a process even after the pid was reused by another one.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def pid_alive(pid: int, start: int | None = None) -> bool:
    """Whether process ``pid`` runs on this host: it exists, is not a zombie (dead, not yet reaped) and, when its
    start time ``start`` is known, is the process that started then (not a later one given the same pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True  # no /proc here (or hidden): the pid exists
    if fields[0] == "Z":
        return False
    return start is None or int(fields[19]) == start


def _write_file(path: Path, info: dict[str, Any]) -> Path:
    """Write ``info`` as JSON to a new temporary file beside ``path``; returns the temporary file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(info, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(tmp)


def read_lock(path: str | os.PathLike) -> dict[str, Any] | None:
    """The holder recorded in lock file ``path``; None when there is none; ``{}`` when it cannot be parsed."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(data)
    except ValueError:  # not JSON, or not text at all (UnicodeDecodeError is a ValueError)
        return {}
    return info if isinstance(info, dict) else {}


def describe_holder(info: dict[str, Any], now: float | None = None) -> str:
    """``pid 123 on host h, started ..., last heartbeat 4 s ago`` for messages."""
    now = time.time() if now is None else now
    started = info.get("started_at") or "at an unknown time"
    beat = info.get("heartbeat")
    age = f"{now - float(beat):.0f} s ago" if isinstance(beat, (int, float)) else "never"
    command = f" ({info['command']})" if info.get("command") else ""
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}{command}, started {started}, "
            f"last heartbeat {age}")


def _remove_if_owner(path: Path, token: str, pid: int, stop: threading.Event) -> None:
    """Stop the heartbeat and delete ``path`` if it still holds ``token`` (never from a forked child)."""
    stop.set()
    if os.getpid() != pid:
        return
    info = read_lock(path)
    if info and info.get("token") == token:
        path.unlink(missing_ok=True)


def _heartbeat(path: Path, token: str, info: dict[str, Any], every: float, stop: threading.Event) -> None:
    """Refresh the heartbeat of ``path`` every ``every`` seconds while it holds ``token``."""
    while not stop.wait(every):
        current = read_lock(path)
        if not current or current.get("token") != token:
            return  # taken over (we stopped refreshing for longer than the timeout) or removed
        tmp = _write_file(path, {**info, "heartbeat": time.time()})
        try:
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _guard(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` while a lock is checked and taken (best effort: some network file
    systems have no ``flock``; the check-and-take then only relies on atomic renames)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


class RunLock:
    """The lock of one run directory (see the module docstring); a context manager.

    Keep a reference while the run lasts: the lock is released by :meth:`release`, on leaving the ``with``
    block, when the object is garbage-collected, or when the interpreter exits normally.

    Args:
        folder: the run directory (created if missing).
        timeout: seconds without a heartbeat after which a holder on another host counts as gone.
        log: where the take-over line goes (the trainer's log).
        command: a short description of the holder (shown to a second trainer).

    Raises:
        RunLockedError: from :meth:`acquire` when a live trainer holds the directory.
    """

    def __init__(self, folder: str | os.PathLike, timeout: float = DEFAULT_TIMEOUT,
                 log: Callable[[str], None] = print, command: str = "") -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.timeout = float(timeout)
        self.log = log
        self.token = uuid.uuid4().hex
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                     "started_at": time.strftime("%Y-%m-%d %H:%M:%S %z"), "started": time.time(),
                     "command": command, "token": self.token}
        self._stop = threading.Event()
        self._finalizer: weakref.finalize | None = None
        self.taken_over: dict[str, Any] | None = None  #: the previous holder, when the lock was taken over

    @property
    def held(self) -> bool:
        """Whether this object holds the lock (acquired, not yet released)."""
        return self._finalizer is not None and self._finalizer.alive

    def holder_gone(self, info: dict[str, Any], now: float | None = None) -> str | None:
        """Why the holder recorded in ``info`` counts as gone, or None when it may still be running."""
        now = time.time() if now is None else now
        if not info:
            age = now - self.path.stat().st_mtime
            return f"the lock file is unreadable and {age:.0f} s old" if age > self.timeout else None
        if info.get("host") == self.info["host"] and isinstance(info.get("pid"), int):
            pid = info["pid"]
            if not pid_alive(pid, info.get("pid_start")):
                return f"its process {pid} no longer exists on this host"
            return None
        beat = info.get("heartbeat")
        if not isinstance(beat, (int, float)) or now - beat > self.timeout:
            return (f"its heartbeat stopped {now - float(beat or 0):.0f} s ago, more than train.lock_timeout="
                    f"{self.timeout:g} s")
        return None

    def acquire(self) -> RunLock:
        """Take the lock, or take it over from a holder that is gone; RunLockedError when it is held."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with _guard(self.folder):
            tmp = _write_file(self.path, {**self.info, "heartbeat": time.time()})
            try:
                try:
                    os.link(tmp, self.path)  # atomic, and fails when a lock exists
                except FileExistsError:
                    self._take_over(tmp)
                except OSError:  # a file system without hard links: exclusive create
                    self._create_exclusive()
            finally:
                tmp.unlink(missing_ok=True)
        stop = self._stop
        self._finalizer = weakref.finalize(self, _remove_if_owner, self.path, self.token, os.getpid(), stop)
        every = max(0.05, self.timeout / 5)
        threading.Thread(target=_heartbeat, args=(self.path, self.token, dict(self.info), every, stop),
                         name="contrastlab-run-lock", daemon=True).start()
        return self

    def _take_over(self, tmp: Path) -> None:
        info = read_lock(self.path)
        if info is None:  # removed in the meantime (a holder ending outside the guard)
            os.link(tmp, self.path)
            return
        why = self.holder_gone(info)
        if why is None and not info:
            raise RunLockedError(self._unreadable_message())
        if why is None:
            raise RunLockedError(
                f"run directory {self.folder} is in use by another trainer: {describe_holder(info)} "
                f"(lock {self.path}). Wait for it to finish, or stop it and run again with resume=auto to "
                f"continue its run; use another out=DIR to train beside it. If no trainer runs there any more "
                f"(a job that died on another host), delete {self.path}, or wait until its heartbeat is older "
                f"than train.lock_timeout={self.timeout:g} s.")
        os.replace(tmp, self.path)
        self.taken_over = info
        self.log(f"run lock: took over {self.path} from {describe_holder(info) if info else 'an unknown holder'}: "
                 f"{why}")

    def _unreadable_message(self) -> str:
        """Why a recent lock file that is not a contrastlab lock stops a trainer, and what to do."""
        try:
            age, start = time.time() - self.path.stat().st_mtime, self.path.read_bytes()[:24]
        except OSError:
            age, start = 0.0, b""
        return (f"run directory {self.folder} holds a lock file that is not a contrastlab run lock: {self.path} is "
                f"unreadable (not the JSON a trainer writes; it starts with {start!r}) and was written {age:.0f} s "
                f"ago. If no trainer runs in {self.folder}, delete {self.path} and run again; otherwise wait: an "
                f"unreadable lock older than train.lock_timeout={self.timeout:g} s is taken over (in "
                f"{max(0.0, self.timeout - age):.0f} s)")

    def _create_exclusive(self) -> None:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            tmp = _write_file(self.path, {**self.info, "heartbeat": time.time()})
            try:
                self._take_over(tmp)
            finally:
                tmp.unlink(missing_ok=True)
            return
        with os.fdopen(fd, "w") as fh:
            json.dump({**self.info, "heartbeat": time.time()}, fh)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours (idempotent)."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> RunLock:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_run_directory(folder: str | os.PathLike, timeout: float, log: Callable[[str], None], main: bool,
                       any_rank: Callable[[bool], bool] = bool, command: str = "") -> RunLock | None:
    """The trainer's lock: rank 0 takes it; when it cannot, every rank raises (none waits for a stopped peer).

    Args:
        folder: the run directory.
        timeout: ``train.lock_timeout``.
        log: the trainer's log (the take-over line).
        main: whether this is rank 0.
        any_rank: agreement across ranks (``engine.distributed.any_rank``); ``bool`` in one process.
        command: shown to a second trainer.

    Returns:
        The held lock on rank 0, None on the other ranks.
    """
    lock, error = None, None
    if main:
        try:
            lock = RunLock(folder, timeout, log=log, command=command).acquire()
        except RunLockedError as exc:
            error = exc
    if any_rank(error is not None):
        if lock is not None:
            lock.release()
        raise error or RunLockedError(f"rank 0 could not lock run directory {folder} (see its message)")
    return lock
