"""Detection tests run on the pure-PyTorch reference backend (a test that wants the kernels sets
TRITON_INTERPRET=1 itself), on one torch thread."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are small: one thread is about as fast on an idle machine and several times faster on
    a busy one (OpenMP workers spin while they wait for a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
