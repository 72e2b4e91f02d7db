import copy

import pytest
import torch
from mmengine.registry import DefaultScope


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Seeded, and one thread: the suite's tensors are small, and on a
    shared 2-core machine OpenMP teams of 2 mostly wait for each other.
    Tests of threading set their own count."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_default_scope():
    """A test that sets mmengine's default scope must not leak it."""
    saved = copy.copy(DefaultScope._instance_dict)
    yield
    DefaultScope._instance_dict = saved
