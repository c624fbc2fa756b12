"""A real single-node SLURM cluster for the tests (``scripts/local_slurm.sh``), shared by pytest-xdist's workers.

Every worker whose tests need the cluster calls :func:`acquire`: it takes a lease for the test session and runs
``local_slurm.sh start``, which is idempotent and serialised by the script's own lock file, so workers starting at
once get one cluster. The process that ran the session (xdist's controller, or the only pytest process) calls
:func:`release` from ``pytest_sessionfinish``, after every worker has finished: the cluster is stopped only when a
test session started it and no other live test session holds a lease on it. A cluster started by hand keeps running.

``local_slurm.sh start`` installs Debian's ``slurm-wlm`` and ``munge`` when they are missing (as root); it exits with
status 3 when it cannot (not root, no apt-get, the install failed), and only then do the tests skip.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "local_slurm.sh"
UNAVAILABLE = 3
"""``local_slurm.sh``'s exit status when SLURM cannot be provided on this machine."""
SESSION_VARIABLE = "CONTRASTLAB_TEST_SESSION"
"""Environment variable naming the test session (the pid of the pytest process that runs it): set by conftest.py,
inherited by xdist's workers."""
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}
"""Job states a job does not leave (``scontrol show job`` keeps them MinJobAge = 300 s)."""


class SlurmUnavailable(Exception):
    """SLURM cannot be installed or started on this machine; the message says why."""


def cluster_dir() -> Path:
    """The folder of the local cluster (the script's ``CONTRASTLAB_SLURM_DIR``)."""
    return Path(os.environ.get("CONTRASTLAB_SLURM_DIR", "/tmp/contrastlab-slurm"))


@dataclass
class Cluster:
    """The running local cluster: SLURM's client commands against it, and the jobs a test submitted."""

    dir: Path
    submitted: list[str] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.dir / "etc" / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for clients and jobs: this cluster's SLURM_CONF; this checkout's sources and the test
        interpreter's folder (torchrun) first on the paths (sbatch exports it to the job)."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "/usr/bin:/bin")))
        env.update(extra)
        return env

    def run(self, *args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """A SLURM client command (sbatch, scontrol, scancel ...); raises with its output when it fails."""
        proc = subprocess.run(list(args), check=False, env=env or self.env(), capture_output=True, text=True,
                              timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Submit a job (``sbatch --parsable ARGS``); its job id. :meth:`cancel_submitted` cancels it."""
        job = self.run("sbatch", "--parsable", *args, env=env).stdout.strip().split(";")[0]
        self.submitted.append(job)
        return job

    def job(self, job: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Reason, ExitCode, Restarts, ...)."""
        line = self.run("scontrol", "-o", "show", "job", job).stdout.strip()
        return dict(re.findall(r"(?:^|\s)([A-Za-z][\w:/]*)=(\S*)", line))

    def wait(self, job: str, until: Callable[[dict[str, str]], bool] | None = None, timeout: float = 180.0,
             log: Path | None = None) -> dict[str, str]:
        """Poll the job until ``until(info)`` (default: a finished state) holds; its info. Fails after ``timeout``
        seconds with the job's state and the tail of ``log``."""
        until = until or (lambda info: info.get("JobState") in FINISHED)
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job)
            if until(info):
                return info
            if time.monotonic() > deadline:
                tail = log.read_text()[-3000:] if log is not None and log.is_file() else "(no output file)"
                raise TimeoutError(f"job {job} after {timeout:.0f} s: JobState={info.get('JobState')} "
                                   f"Reason={info.get('Reason')}\n{tail}")
            time.sleep(0.2)

    def cancel_submitted(self) -> None:
        """Cancel the jobs submitted through :meth:`sbatch` that have not finished (a failed test leaves none)."""
        for job in self.submitted:
            self.run("scancel", job, check=False)
        self.submitted.clear()


def session_id() -> str:
    """This test session's id (conftest.py sets it in the controlling pytest process; workers inherit it)."""
    return os.environ.setdefault(SESSION_VARIABLE, str(os.getpid()))


@contextmanager
def _leases_locked() -> Iterator[Path]:
    folder = cluster_dir() / "tests"
    (folder / "leases").mkdir(parents=True, exist_ok=True)
    with open(folder / "leases.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _controller_pid() -> int | None:
    try:
        pid = int((cluster_dir() / "run" / "slurmctld.pid").read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, ValueError):
        return False


def acquire() -> Cluster:
    """Start the local cluster if it does not run (idempotent, safe from several workers at once) and take this
    session's lease on it.

    Raises:
        SlurmUnavailable: the script exited with status 3 (the packages cannot be installed, or not as root).
        RuntimeError: the cluster did not start (the script's output says why).
    """
    if os.geteuid() != 0:  # only a cluster root started can serve this session, and it never stops it
        _start()
        return Cluster(cluster_dir())
    with _leases_locked() as folder:
        (folder / "leases" / session_id()).touch()
        try:
            started = _start()
        except SlurmUnavailable:
            (folder / "leases" / session_id()).unlink(missing_ok=True)
            raise
        if started:  # this session started it: stop it when the session ends
            (folder / "started_by_tests").write_text(str(_controller_pid()))
    return Cluster(cluster_dir())


def _start() -> bool:
    """``local_slurm.sh start``; whether it started the cluster (False: it was running)."""
    t0 = time.monotonic()
    proc = subprocess.run([str(SCRIPT), "start"], check=False, capture_output=True, text=True, timeout=900)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode == UNAVAILABLE:
        raise SlurmUnavailable(output)
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/local_slurm.sh start failed ({proc.returncode}):\n{output}")
    if "already running" in proc.stdout:
        return False
    print(f"\nlocal SLURM cluster started in {time.monotonic() - t0:.1f} s:\n{output}", file=sys.stderr)
    return True


def release() -> str | None:
    """Drop this session's lease; stop the cluster when a test session started it and no live session holds a
    lease. What was done, or None when this session held no lease."""
    with _leases_locked() as folder:
        lease = folder / "leases" / session_id()
        if not lease.exists():
            return None
        lease.unlink()
        others = []
        for other in (folder / "leases").iterdir():
            if _alive(other.name):
                others.append(other)
            else:  # a session that ended without releasing (killed)
                other.unlink(missing_ok=True)
        marker = folder / "started_by_tests"
        if others or not marker.is_file():
            return None
        started = marker.read_text().strip()
        marker.unlink()
        if started != str(_controller_pid()):  # restarted by someone else since: theirs now
            return None
        proc = subprocess.run([str(SCRIPT), "stop"], check=False, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"scripts/local_slurm.sh stop failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc.stdout.strip()
