"""The steps that ``tools/train.py`` and ``tools/test.py`` share.

Both tools take a config, ``--work-dir``, ``--cfg-options`` and the
launcher options; load the config the same way (``--cfg-options``, then the
work dir: command line > config > ``./work_dirs/<config name>``); run the
checks of :mod:`mmssm.utils.setup_env`; and build the Runner. A problem with
the user's input ends a tool with ``error: <message>`` (exit status 1).

mmdet and mmseg are imported only when a config's modules are registered,
as in :mod:`mmssm.utils.setup_env`.
"""

import argparse
import contextlib
import os
import os.path as osp
import sys
import traceback
from typing import Callable, Iterator, List, Optional, Tuple

import torch.distributed as torch_dist
from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from .setup_env import (
    InputError,
    check_data_paths,
    check_pretrained,
    config_task,
    register_modules,
    setup_cpu_distributed,
)


def parse_tool_args(
    argv: Optional[List[str]],
    description: str,
    config_help: str,
    work_dir_help: str,
    cfg_options_help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
) -> argparse.Namespace:
    """Parse the command line of a tool; set ``LOCAL_RANK`` if unset.

    The arguments are ``config``, ``--work-dir``, those of
    ``add_arguments``, ``--cfg-options``, ``--launcher`` and
    ``--local-rank``, in this order.

    Args:
        argv (list[str], optional): The arguments; None for ``sys.argv``.
        description (str): The description of the tool.
        config_help (str): The help of ``config``.
        work_dir_help (str): The help of ``--work-dir``.
        cfg_options_help (str): The help of ``--cfg-options``.
        add_arguments (Callable): Adds the tool's own arguments.

    Returns:
        argparse.Namespace: The parsed arguments.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('config', help=config_help)
    parser.add_argument('--work-dir', help=work_dir_help)
    add_arguments(parser)
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help=cfg_options_help,
    )
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm'],
        default='none',
        help='job launcher',
    )
    # torch.distributed.launch passes --local-rank (torchrun sets LOCAL_RANK)
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def load_config(
    config: str,
    launcher: str,
    cfg_options: Optional[dict],
    work_dir: Optional[str],
    checkpoint: Optional[str] = None,
) -> Config:
    """The config file after the command line.

    Args:
        config (str): The config file.
        launcher (str): 'none', 'pytorch' or 'slurm'.
        cfg_options (dict, optional): ``--cfg-options``.
        work_dir (str, optional): ``--work-dir``; None takes the config's,
            else ``./work_dirs/<config name>``.
        checkpoint (str, optional): A checkpoint the tool will load, checked
            (unless a URL) before the config is read. Defaults to None.

    Returns:
        Config: The config.

    Raises:
        InputError: If the config file or the checkpoint does not exist.
    """
    if not osp.isfile(config):
        raise InputError(f'config file {config!r} does not exist')
    if (
        checkpoint is not None
        and '://' not in checkpoint
        and not osp.isfile(checkpoint)
    ):
        raise InputError(f'checkpoint {checkpoint!r} does not exist')
    cfg = Config.fromfile(config)
    cfg.launcher = launcher
    if cfg_options is not None:
        cfg.merge_from_dict(cfg_options)
    # work_dir: command line > config > ./work_dirs/<config name>
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join(
            './work_dirs', osp.splitext(osp.basename(config))[0]
        )
    return cfg


def prepare_run(
    cfg: Config, mode: str, launcher: str
) -> Tuple[str, Optional[str]]:
    """Register the config's modules and check its input, before the Runner.

    Registers the toolbox of the config and mmssm's modules, checks the data
    of ``mode`` (and for training the ``Pretrained`` weights) and sets up a
    distributed run without CUDA (:func:`setup_cpu_distributed`).

    Args:
        cfg (Config): The config, modified in place.
        mode (str): 'train' or 'test'.
        launcher (str): 'none', 'pytorch' or 'slurm'.

    Returns:
        tuple[str, str | None]: The toolbox ('mmdet' or 'mmseg') and the
        note of :func:`setup_cpu_distributed`.

    Raises:
        InputError: Naming what is wrong with the input.
    """
    task = config_task(cfg)
    register_modules(task)
    check_data_paths(cfg, mode)
    if mode == 'train':
        check_pretrained(cfg)
    note = setup_cpu_distributed(cfg, launcher)
    return task, note


@contextlib.contextmanager
def exit_on_input_error() -> Iterator[None]:
    """End the tool with ``error: <message>`` on an :class:`InputError`."""
    try:
        yield
    except InputError as e:
        sys.exit(f'error: {e}')


def build_runner(cfg: Config, config: str) -> Runner:
    """The Runner of the config (``runner_type`` if it names one).

    A config that does not build (mostly: ``ValueError``, ``TypeError`` or
    ``KeyError``) ends the tool with the traceback and an error naming
    ``config``.

    Args:
        cfg (Config): The config.
        config (str): The config file, for the error message.

    Returns:
        Runner: The Runner.
    """
    try:
        if 'runner_type' in cfg:
            return RUNNERS.build(cfg)
        return Runner.from_cfg(cfg)
    except (ValueError, TypeError, KeyError) as e:  # mostly config errors
        traceback.print_exc()
        sys.exit(
            f'error: the config {config!r} does not build: '
            f'{type(e).__name__}: {e}'
        )


def end_distributed() -> None:
    """Leave the process group once a run has finished on every rank.

    Left to the interpreter's exit, the process group's threads can be torn
    down while still joinable; the process then aborts ("terminate called
    without an active exception", exit status -6) after a run that
    succeeded. The barrier lets every rank finish first.
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()
