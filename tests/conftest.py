"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import slurm_cluster
import torch

# torch.compile (data.compile_views tests): on CI's 2 cores, inductor's pool of compile workers costs more than it
# saves (a cold compile of the renderer took 35 s with the pool, 25 s without).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one intra-op thread, restoring the count afterwards.

    Small tensors on the 2 shared cores of CI only contend with a second thread, and bit-for-bit comparisons
    with subprocesses started with ``OMP_NUM_THREADS=1`` need the same float reduction order here.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def session_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of this test session that every pytest-xdist worker sees (each worker's own base temp is below it):
    where a fixture computed once per session leaves its result for the other workers."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_xdist_worker():
    """Under ``pytest -n 2`` (pytest-xdist), each worker runs torch on one intra-op thread: two workers on two
    cores, instead of four threads contending for them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
    yield


def pytest_configure(config: pytest.Config) -> None:
    """Name the test session after the pytest process that runs it (xdist's workers inherit the variable): the
    local SLURM cluster's leases (tests/slurm_cluster.py) are per session."""
    if not hasattr(config, "workerinput"):
        os.environ[slurm_cluster.SESSION_VARIABLE] = str(os.getpid())


NUMERICS_FILES = pytest.StashKey[set]()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Before ``-m`` deselects any: the files that hold tests marked ``numerics`` (test_docs checks that `make
    test`'s numerics pass collects them all)."""
    config.stash[NUMERICS_FILES] = {Path(item.path).resolve() for item in items if item.get_closest_marker("numerics")}


def pytest_sessionfinish(session: pytest.Session) -> None:
    """After every worker has finished: stop the local SLURM cluster if this session started it and no other
    test session still uses it."""
    if not hasattr(session.config, "workerinput"):
        done = slurm_cluster.release()
        if done:
            print(f"\n{done}", file=sys.stderr)


@pytest.fixture(scope="session")
def slurm_cluster_session() -> slurm_cluster.Cluster:
    """A real single-node SLURM cluster (scripts/local_slurm.sh start), shared by the session's workers; skips,
    saying why, only when SLURM cannot be installed here."""
    try:
        return slurm_cluster.acquire()
    except slurm_cluster.SlurmUnavailable as exc:
        pytest.skip(f"no SLURM cluster on this machine: {exc}")


@pytest.fixture
def slurm(slurm_cluster_session: slurm_cluster.Cluster) -> Iterator[slurm_cluster.Cluster]:
    """The local SLURM cluster for one test; jobs the test submitted and left running are cancelled after it."""
    cluster = slurm_cluster.Cluster(slurm_cluster_session.dir)
    yield cluster
    cluster.cancel_submitted()
