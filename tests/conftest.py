"""Fixtures shared by several test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: torch's thread pool costs more than it gives on a shared machine.
    A module takes it with ``pytestmark = pytest.mark.usefixtures("one_thread")``; the
    thread count is put back after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
