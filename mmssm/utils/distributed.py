"""Distributed runs on machines without CUDA, and their teardown.

mmengine's launchers call ``torch.cuda.set_device`` (under Slurm they also
divide by the number of GPUs) and wrap the model with
``device_ids=[LOCAL_RANK]``; the configs ask for NCCL; torch's DDP refuses
SyncBN layers of a CPU model. Without CUDA, :func:`setup_cpu_distributed`
initialises a gloo process group itself, so that mmengine skips its own,
and has the model wrapped by :class:`CPUDistributedDataParallel`.
"""

import datetime
import logging
import os
import subprocess
from typing import Optional

import torch
import torch.distributed as torch_dist
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.model import MMDistributedDataParallel, revert_sync_batchnorm


class CPUDistributedDataParallel(MMDistributedDataParallel):
    """mmengine's DDP wrapper for CPU processes: SyncBN reverted to BN.

    The config names it by its import path (mmengine's registries resolve
    ``type`` strings of that form), so it needs no registry of its own.

    Args:
        module (nn.Module): The model; its SyncBN layers become mmengine's
            ``BatchNormXd`` with the same parameters and statistics.
        **kwargs: Those of :class:`MMDistributedDataParallel`;
            ``device_ids`` must be None.
    """

    def __init__(self, module: torch.nn.Module, **kwargs) -> None:
        num = sum(
            'SyncBatchNorm' in type(m).__name__ for m in module.modules()
        )  # torch's and mmcv's
        if num:
            print_log(
                f'{num} SyncBN layer(s) reverted to BN', logger='current'
            )
        super().__init__(module=revert_sync_batchnorm(module), **kwargs)


def setup_cpu_distributed(cfg: Config, launcher: str) -> Optional[str]:
    """Make a distributed run work on a machine without CUDA.

    With a launcher and without CUDA: ``env_cfg.dist_cfg.backend='gloo'``,
    the model wrapped by :class:`CPUDistributedDataParallel` (unless the
    config names another wrapper) with ``device_ids=None``, and the process
    group initialised here.

    Args:
        cfg (Config): The config, modified in place.
        launcher (str): 'none', 'pytorch' or 'slurm'.

    Returns:
        str | None: A note of what was changed, or None if nothing was.

    """
    if launcher == 'none' or torch.cuda.is_available():
        return None
    dist_cfg = cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})
    dist_cfg['backend'] = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg') or dict(
        broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False),
    )
    if wrapper.get('type', 'MMDistributedDataParallel') == (
        'MMDistributedDataParallel'
    ):
        wrapper['type'] = f'{__name__}.{CPUDistributedDataParallel.__name__}'
    wrapper['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper
    if not torch_dist.is_initialized():
        if launcher == 'slurm':
            _slurm_env()
        timeout = dist_cfg.get('timeout')
        kwargs = {}
        if timeout is not None:
            kwargs['timeout'] = datetime.timedelta(seconds=timeout)
        torch_dist.init_process_group(backend='gloo', **kwargs)
    return 'no CUDA: distributed backend gloo, model on the CPU'


def _slurm_env() -> None:
    """Set torch.distributed's env:// variables from Slurm's, as mmengine."""
    os.environ.setdefault('MASTER_PORT', '29500')
    if 'MASTER_ADDR' not in os.environ:
        nodes = os.environ['SLURM_NODELIST']
        os.environ['MASTER_ADDR'] = subprocess.getoutput(
            f'scontrol show hostname {nodes} | head -n1'
        )
    os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
    os.environ['RANK'] = os.environ['SLURM_PROCID']
    os.environ['LOCAL_RANK'] = os.environ.get('SLURM_LOCALID', '0')


def end_distributed() -> None:
    """Leave the process group once a run has finished on every rank.

    Left to the interpreter's exit, the process group's threads can be torn
    down while still joinable, and a process that succeeded aborts
    ("terminate called without an active exception", exit status -6). The
    barrier lets every rank finish first.
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def cap_cpu_threads(local_world_size: int) -> Optional[str]:
    """Give each of a node's CPU processes at most its share of the cores.

    Processes that together run more OpenMP threads than there are cores
    make each thread wait for the others at every parallel region (2
    processes of 2 threads on 2 cores trained about 9 times slower than
    with 1 thread each). The usable cores are those of the process's CPU
    affinity (``os.sched_getaffinity``: a container or ``taskset`` limit),
    not ``os.cpu_count()``. Without CUDA and with more than one process on
    the node, the torch threads are set to ``OMP_NUM_THREADS`` if it is
    within the share, else to the share, with a warning saying why.

    Args:
        local_world_size (int): The processes on this node.

    Returns:
        str | None: What was chosen, for the log; None if nothing was set
        (one process, or CUDA).
    """
    if local_world_size <= 1 or torch.cuda.is_available():
        return None
    usable = len(os.sched_getaffinity(0))
    share = max(1, usable // local_world_size)
    requested = os.environ.get('OMP_NUM_THREADS', '').strip()
    threads = share
    why = f'{local_world_size} processes on {usable} usable cores'
    if requested.isdigit() and int(requested) > 0:
        if int(requested) <= share:
            threads = int(requested)
            why += f', OMP_NUM_THREADS={requested}'
        else:
            print_log(
                f'OMP_NUM_THREADS={requested} is more than the share of a '
                f'process ({why}: {share}): capped to {share}, since '
                'processes whose threads outnumber the cores wait for each '
                'other at every step',
                logger='current',
                level=logging.WARNING,
            )
    torch.set_num_threads(threads)
    os.environ['OMP_NUM_THREADS'] = str(threads)
    return f'CPU threads per process: {threads} ({why})'


def local_world_size() -> int:
    """The processes of this run on this node.

    torchrun's ``LOCAL_WORLD_SIZE``, else Slurm's tasks per node, else
    mmengine's local group, else the world size.
    """
    for name in ('LOCAL_WORLD_SIZE', 'SLURM_NTASKS_PER_NODE'):
        value = os.environ.get(name, '')
        if value.isdigit():
            return int(value)
    from mmengine.dist import get_local_size, get_world_size

    try:
        return get_local_size()
    except RuntimeError:  # no local group (the process group is ours)
        return get_world_size()
