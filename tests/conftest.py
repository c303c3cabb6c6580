import pytest
import torch


@pytest.fixture
def frugal_torch():
    """One thread and a fixed seed for small in-process model tests (the CPU is shared with Ray and launcher
    subprocesses); the thread count is restored afterwards."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
