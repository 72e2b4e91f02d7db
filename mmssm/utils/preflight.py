"""Checks of a config's input before a run starts.

The toolbox of a config comes from its ``default_scope``. A missing data
set, annotation file or pretrained checkpoint would otherwise be found late
(when the first dataloader is built, or after the data sets are loaded);
here each becomes one :class:`~mmssm.errors.UserError` naming every
missing path and the config key that holds it. Remote paths (URLs,
``backend_args``) are not checked.
"""

import os
import os.path as osp
from typing import Iterator, List, Mapping, Tuple

from mmengine.config import Config

from mmssm.errors import UserError

# The default scopes of the configs that the tools run.
TOOLBOXES = ('mmdet', 'mmseg', 'mmpretrain')


def config_task(cfg: Config) -> str:
    """The toolbox of a config (one of :data:`TOOLBOXES`).

    Args:
        cfg (Config): The config.

    Returns:
        str: Its ``default_scope``, e.g. 'mmdet' or 'mmseg'.

    Raises:
        UserError: If ``default_scope`` is missing or another toolbox's.
    """
    scope = cfg.get('default_scope')
    if scope not in TOOLBOXES:
        raise UserError(
            f'default_scope of the config is {scope!r}; the mmssm tools run '
            f'configs whose default_scope is one of {list(TOOLBOXES)}'
        )
    return scope


def _is_remote(path: str) -> bool:
    return '://' in path or path.startswith('s3:')


def _missing(key: str, path, kind: str = 'file') -> List[str]:
    """``['<key>: <kind> <path> does not exist']``, or [] if it does."""
    if not isinstance(path, str) or not path or _is_remote(path):
        return []
    exists = osp.isfile if kind == 'file' else osp.isdir
    return [] if exists(path) else [f'{key}: {kind} {path!r} does not exist']


def _nodes(cfg, where: str) -> Iterator[Tuple[str, Mapping]]:
    """Every mapping of a config tree, with its key (``a.b[0].c``)."""
    if isinstance(cfg, Mapping):
        yield where, cfg
        for key, value in cfg.items():
            yield from _nodes(value, f'{where}.{key}')
    elif isinstance(cfg, (list, tuple)):
        for i, value in enumerate(cfg):
            yield from _nodes(value, f'{where}[{i}]')


def _data_problems(cfg, where: str) -> List[str]:
    """The missing local paths of the datasets and metrics under ``cfg``."""
    problems = []
    for key, node in _nodes(cfg, where):
        root = node.get('data_root') or ''
        if node.get('backend_args') or _is_remote(root):
            continue
        if root and not osp.isdir(root):
            problems.append(
                f'{key}.data_root: directory {root!r} does not exist '
                f'(cwd {os.getcwd()!r})'
            )
            continue
        # relative paths are under data_root, as in mmengine's BaseDataset
        prefixes = node.get('data_prefix')
        paths = [('ann_file', node.get('ann_file'), 'file')]
        if isinstance(prefixes, str):  # mmpretrain's: one image folder
            prefixes = {'': prefixes}
        if isinstance(prefixes, Mapping):
            paths += [
                (f'data_prefix.{name}'.rstrip('.'), prefix, 'directory')
                for name, prefix in prefixes.items()
            ]
        for name, path, kind in paths:
            if isinstance(path, str) and path:
                problems += _missing(
                    f'{key}.{name}', osp.join(root, path), kind
                )
    return problems


def check_data_paths(cfg: Config, mode: str) -> None:
    """Check that the data a run will read exists.

    ``mode='train'`` checks the train dataloader and, if validation runs
    (``val_cfg``), the val dataloader and evaluator; ``mode='test'`` the
    test dataloader and evaluator. Each dataset's ``data_root``,
    ``ann_file`` and ``data_prefix`` entries are checked, and the
    evaluators' ``ann_file``.

    Args:
        cfg (Config): The config.
        mode (str): 'train' or 'test'.

    Raises:
        UserError: Naming every missing path and the key that holds it.
    """
    if mode not in ('train', 'test'):
        raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
    parts = [mode]
    if mode == 'train' and cfg.get('val_cfg') and cfg.get('val_dataloader'):
        parts.append('val')
    problems: List[str] = []
    for part in parts:
        loader = cfg.get(f'{part}_dataloader')
        if not loader:
            raise UserError(f'the config has no {part}_dataloader')
        where = f'{part}_dataloader.dataset'
        problems += _data_problems(loader.get('dataset'), where)
        if part != 'train':
            evaluator = cfg.get(f'{part}_evaluator')
            problems += _data_problems(evaluator, f'{part}_evaluator')
    if problems:
        raise UserError(
            'missing data (set the paths with --cfg-options or see the '
            'README for how to prepare the dataset):\n  '
            + '\n  '.join(dict.fromkeys(problems))
        )


def check_pretrained(cfg: Config) -> None:
    """Check that the local checkpoints of ``Pretrained`` inits exist.

    Args:
        cfg (Config): The config.

    Raises:
        UserError: Naming the config key and the file.
    """
    problems = [
        problem
        for key, node in _nodes(cfg.get('model'), 'model')
        if node.get('type') == 'Pretrained'
        for problem in _missing(f'{key}.checkpoint', node.get('checkpoint'))
    ]
    if problems:
        raise UserError(
            'missing pretrained weights (convert the official ones with '
            'tools/model_converters/, see the config, or pass '
            '--cfg-options <key without .checkpoint>=None to start from '
            'scratch):\n  ' + '\n  '.join(problems)
        )
