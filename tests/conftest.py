"""Fixtures shared by several test modules."""

from __future__ import annotations

import os

import pytest
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


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_xdist_worker():
    """Under ``pytest -n 2`` (pytest-xdist), each worker runs torch on one intra-op thread: two workers on two
    cores, instead of four threads contending for them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
    yield
