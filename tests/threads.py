"""`one_thread`: an autouse fixture a test module imports to run its tests on one torch CPU thread."""
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many small CPU ops (convolutions, per-tile ops, Inception): one thread is faster than two contended ones on
    a loaded machine. The thread count is restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
