"""The command line of the tools: one exit for user errors, the Runner.

:func:`exit_on_user_error` wraps the ``main`` of every tool: a
:class:`~mmssm.errors.UserError` ends it with ``error: <message>`` and exit
status 1, anything else keeps its traceback. ``tools/train.py`` and
``tools/test.py`` build their command line with :func:`runner_parser`,
their config with :func:`load_config` and their Runner with
:func:`build_runner`.
"""

import argparse
import functools
import os
import os.path as osp
from typing import Callable, TypeVar

from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from mmssm.errors import UserError

Main = TypeVar('Main', bound=Callable)


def exit_on_user_error(main: Main) -> Main:
    """Decorate a tool's ``main``: a UserError ends it with ``error: ...``.

    The message goes to stderr and the exit status is 1 (``SystemExit``
    with the message, so a caller in the same process can catch it). Any
    other exception goes through with its traceback.

    Args:
        main (Callable): The tool's entry point.

    Returns:
        Callable: ``main``, wrapped.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            raise SystemExit(f'error: {e}') from None

    return wrapper


def runner_parser(description: str) -> argparse.ArgumentParser:
    """The arguments that train.py and test.py share.

    ``config``, ``--work-dir``, ``--cfg-options``, ``--launcher`` and
    ``--local-rank``; a tool adds its own.

    Args:
        description (str): The description of the tool.

    Returns:
        argparse.ArgumentParser: The parser.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('config', help='config file')
    parser.add_argument(
        '--work-dir',
        help='where to save logs, checkpoints and metrics (default: the '
        "config's work_dir, else ./work_dirs/<config name>)",
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, key=value (e.g. '
        'train_cfg.max_epochs=1 model.backbone.backbone.arch=l2)',
    )
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm'],
        default='none',
        help='job launcher',
    )
    # torch.distributed.launch passes --local-rank (torchrun sets LOCAL_RANK)
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return parser


def load_config(args: argparse.Namespace) -> Config:
    """The config of :func:`runner_parser`'s arguments.

    ``--cfg-options`` are merged, then the work dir is set: command line >
    config > ``./work_dirs/<config name>``.

    Args:
        args (argparse.Namespace): The parsed arguments.

    Returns:
        Config: The config, with ``launcher`` set.

    Raises:
        UserError: If the config file does not exist.
    """
    if not osp.isfile(args.config):
        raise UserError(f'config file {args.config!r} does not exist')
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        name = osp.splitext(osp.basename(args.config))[0]
        cfg.work_dir = osp.join('./work_dirs', name)
    return cfg


def build_runner(cfg: Config, config: str) -> Runner:
    """The Runner of a config (of ``runner_type`` if it names one).

    Args:
        cfg (Config): The config.
        config (str): The config file, named in a user error.

    Returns:
        Runner: The Runner; it sets the config's ``default_scope``, whose
        registries import their modules (registry ``locations``).

    Raises:
        UserError: If a module of the config refuses its settings.
    """
    try:
        if 'runner_type' in cfg:
            return RUNNERS.build(cfg)
        return Runner.from_cfg(cfg)
    except UserError as e:
        raise UserError(f'the config {config!r} does not build: {e}') from e
