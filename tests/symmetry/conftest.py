"""One intra-op thread for these tests: their tensors are small, and on a shared 2-core machine
OpenMP threads waiting for a preempted sibling made them several times slower."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
