"""CPU threads of distributed processes: at most their share of the cores."""

import os

import pytest
import torch

from mmssm.utils import distributed
from mmssm.utils.distributed import cap_cpu_threads


@pytest.fixture
def machine(monkeypatch):
    """4 usable cores, no CUDA; torch's threads restored afterwards."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    logged = []
    monkeypatch.setattr(
        distributed, 'print_log', lambda msg, **kw: logged.append(msg)
    )
    yield logged
    torch.set_num_threads(threads)


def test_share_of_the_usable_cores(machine, monkeypatch):
    note = cap_cpu_threads(2)
    assert note == 'CPU threads per process: 2 (2 processes on 4 usable cores)'
    assert torch.get_num_threads() == 2
    assert os.environ['OMP_NUM_THREADS'] == '2'  # for child processes
    monkeypatch.delenv('OMP_NUM_THREADS')
    assert cap_cpu_threads(8).startswith('CPU threads per process: 1 ')
    assert not machine  # no warning


def test_smaller_setting_is_kept(machine, monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    assert cap_cpu_threads(2) == (
        'CPU threads per process: 1 (2 processes on 4 usable cores, '
        'OMP_NUM_THREADS=1)'
    )
    assert torch.get_num_threads() == 1 and not machine


def test_larger_setting_is_capped_with_a_warning(machine, monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '4')
    assert cap_cpu_threads(2).startswith('CPU threads per process: 2 ')
    assert torch.get_num_threads() == 2
    (warning,) = machine
    assert warning.startswith(
        'OMP_NUM_THREADS=4 is more than the share of a process (2 processes '
        'on 4 usable cores: 2): capped to 2'
    )


def test_one_process_is_left_alone(machine):
    threads = torch.get_num_threads()
    assert cap_cpu_threads(1) is None
    assert torch.get_num_threads() == threads
