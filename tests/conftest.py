"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch


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
