"""What ``tools/train.py`` and ``tools/test.py`` do before the Runner.

Both tools take mmdet and mmseg configs alike: the config's
``default_scope`` says which toolbox it belongs to. The checks here turn the
usual late failures (a missing annotation file found when the first
dataloader is built, a checkpoint of another model loaded with a warning)
into clear errors before any training or testing starts.

mmdet and mmseg are imported only inside the functions that need them, so
``import mmssm`` keeps working without either.
"""

import importlib
import os
import os.path as osp
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from mmengine.config import Config

TASKS = ('mmdet', 'mmseg')


class InputError(Exception):
    """A problem with the user's input (config, data, checkpoint)."""


def config_task(cfg: Config) -> str:
    """The toolbox of a config: 'mmdet' or 'mmseg', from ``default_scope``.

    Args:
        cfg (Config): The config.

    Returns:
        str: 'mmdet' or 'mmseg'.

    Raises:
        InputError: If ``default_scope`` is missing or another toolbox.
    """
    scope = cfg.get('default_scope', None)
    if scope not in TASKS:
        raise InputError(
            f'default_scope of the config is {scope!r}; mmssm tools run '
            f"mmdet and mmseg configs (default_scope='mmdet' or 'mmseg')"
        )
    return scope


def register_modules(task: str) -> None:
    """Register the toolbox's modules and mmssm's, and set the scope.

    Args:
        task (str): 'mmdet' or 'mmseg'.
    """
    if task not in TASKS:
        raise ValueError(f'task must be one of {TASKS}, got {task!r}')
    utils = importlib.import_module(f'{task}.utils')
    utils.register_all_modules(init_default_scope=True)
    importlib.import_module('mmssm.models')
    importlib.import_module('mmssm.engine')


# --------------------------------------------------------------------------
# Data paths
# --------------------------------------------------------------------------
def _datasets(cfg: Mapping, where: str) -> Iterator[Tuple[str, Mapping]]:
    """Walk a dataset config and its wrapped datasets (Concat, Repeat...)."""
    if not isinstance(cfg, Mapping):
        return
    yield where, cfg
    if isinstance(cfg.get('dataset'), Mapping):
        yield from _datasets(cfg['dataset'], f'{where}.dataset')
    for i, sub in enumerate(cfg.get('datasets') or []):
        yield from _datasets(sub, f'{where}.datasets[{i}]')


def _is_remote(path: str) -> bool:
    return '://' in path or path.startswith('s3:')


def _dataset_problems(cfg: Mapping, where: str) -> List[str]:
    data_root = cfg.get('data_root') or ''
    if cfg.get('backend_args') or _is_remote(data_root):
        return []  # remote storage: not ours to check
    problems = []
    if data_root and not osp.isdir(data_root):
        return [
            f'{where}.data_root: directory {data_root!r} does not exist '
            f'(cwd {os.getcwd()!r})'
        ]
    ann_file = cfg.get('ann_file') or ''
    if isinstance(ann_file, str) and ann_file and not _is_remote(ann_file):
        path = ann_file
        if data_root and not osp.isabs(path):
            path = osp.join(data_root, path)
        if not osp.isfile(path):
            problems.append(f'{where}.ann_file: file {path!r} does not exist')
    prefixes = cfg.get('data_prefix') or {}
    for key, prefix in (
        prefixes.items() if isinstance(prefixes, Mapping) else ()
    ):
        if not isinstance(prefix, str) or not prefix or _is_remote(prefix):
            continue
        path = prefix
        if data_root and not osp.isabs(path):
            path = osp.join(data_root, path)
        if not osp.isdir(path):
            problems.append(
                f'{where}.data_prefix.{key}: directory {path!r} does not exist'
            )
    return problems


def _evaluator_problems(cfg, where: str) -> List[str]:
    if isinstance(cfg, Mapping) and 'metrics' in cfg:
        cfg = cfg['metrics']
    metrics = cfg if isinstance(cfg, (list, tuple)) else [cfg]
    problems = []
    for i, metric in enumerate(metrics):
        if not isinstance(metric, Mapping) or metric.get('backend_args'):
            continue
        ann_file = metric.get('ann_file')
        name = where if len(metrics) == 1 else f'{where}[{i}]'
        if (
            isinstance(ann_file, str)
            and ann_file
            and not _is_remote(ann_file)
            and not osp.isfile(ann_file)
        ):
            problems.append(
                f'{name}.ann_file: file {ann_file!r} does not exist'
            )
    return problems


def check_data_paths(cfg: Config, mode: str) -> None:
    """Check that the data a run will read exists, before it starts.

    ``mode='train'`` checks the train dataloader and, if validation runs
    (``val_cfg``), the val dataloader and evaluator; ``mode='test'`` the test
    dataloader and evaluator. Each dataset's ``data_root``, ``ann_file`` and
    ``data_prefix`` entries are checked (relative ones joined to
    ``data_root``, as mmengine's ``BaseDataset`` does), and the evaluators'
    ``ann_file``. Datasets read through ``backend_args`` are skipped.

    Args:
        cfg (Config): The config.
        mode (str): 'train' or 'test'.

    Raises:
        InputError: Naming every missing path and the config key that holds
            it.
    """
    if mode == 'train':
        parts = ['train']
        if cfg.get('val_cfg') and cfg.get('val_dataloader'):
            parts.append('val')
    elif mode == 'test':
        parts = ['test']
    else:
        raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
    problems: List[str] = []
    for part in parts:
        loader = cfg.get(f'{part}_dataloader')
        if not loader:
            raise InputError(f'the config has no {part}_dataloader')
        for where, dataset in _datasets(
            loader.get('dataset'), f'{part}_dataloader.dataset'
        ):
            problems += _dataset_problems(dataset, where)
        evaluator = cfg.get(f'{part}_evaluator')
        if part != 'train' and evaluator:
            problems += _evaluator_problems(evaluator, f'{part}_evaluator')
    if problems:
        raise InputError(
            'missing data (set the paths with --cfg-options or see the '
            'README for how to prepare the dataset):\n  '
            + '\n  '.join(dict.fromkeys(problems))
        )


def _pretrained(cfg, where: str) -> Iterator[Tuple[str, str]]:
    """(config key, checkpoint) of every ``Pretrained`` init_cfg."""
    if isinstance(cfg, Mapping):
        init_cfgs = cfg.get('init_cfg')
        if isinstance(init_cfgs, Mapping):
            init_cfgs = [init_cfgs]
        for i, init_cfg in enumerate(init_cfgs or []):
            if (
                isinstance(init_cfg, Mapping)
                and init_cfg.get('type') == 'Pretrained'
                and isinstance(init_cfg.get('checkpoint'), str)
            ):
                key = f'{where}.init_cfg'
                if len(init_cfgs) > 1:
                    key += f'[{i}]'
                yield f'{key}.checkpoint', init_cfg['checkpoint']
        for key, value in cfg.items():
            if key != 'init_cfg':
                yield from _pretrained(value, f'{where}.{key}')
    elif isinstance(cfg, (list, tuple)):
        for i, value in enumerate(cfg):
            yield from _pretrained(value, f'{where}[{i}]')


def check_pretrained(cfg: Config) -> None:
    """Check that the local checkpoints of ``Pretrained`` inits exist.

    Without this a missing file is found only when the weights are
    initialised, after the datasets have been loaded.

    Args:
        cfg (Config): The config.

    Raises:
        InputError: Naming the config key and the file.
    """
    problems = [
        f'{key}: file {path!r} does not exist'
        for key, path in _pretrained(cfg.get('model'), 'model')
        if '://' not in path and not osp.isfile(path)
    ]
    if problems:
        raise InputError(
            'missing pretrained weights (convert the official ones with '
            'tools/model_converters/, see the config, or pass '
            '--cfg-options <key without .checkpoint>=None to start from '
            'scratch):\n  ' + '\n  '.join(problems)
        )


# --------------------------------------------------------------------------
# Distributed runs without CUDA
# --------------------------------------------------------------------------
def _sync_bn_to_bn(cfg) -> int:
    """Replace ``type='SyncBN'`` by ``'BN'`` in place; return the count."""
    count = 0
    if isinstance(cfg, Mapping):
        if cfg.get('type') == 'SyncBN':
            cfg['type'] = 'BN'
            count += 1
        for value in cfg.values():
            count += _sync_bn_to_bn(value)
    elif isinstance(cfg, (list, tuple)):
        for value in cfg:
            count += _sync_bn_to_bn(value)
    return count


def setup_cpu_distributed(cfg: Config, launcher: str) -> Optional[str]:
    """Make a distributed run work on a machine without CUDA.

    mmengine's launchers call ``torch.cuda.set_device`` and wrap the model
    with ``device_ids=[LOCAL_RANK]``, and the configs ask for NCCL and
    SyncBN: none of that works on the CPU. Without CUDA (and with a launcher)
    this sets ``env_cfg.dist_cfg.backend='gloo'``, initialises the process
    group itself (so mmengine skips its own initialisation), wraps the model
    with ``device_ids=None`` and turns SyncBN into BN in the model config
    (torch's SyncBN needs CUDA tensors).

    Args:
        cfg (Config): The config, modified in place.
        launcher (str): 'none', 'pytorch' or 'slurm'.

    Returns:
        str | None: A note of what was changed, or None if nothing was.
    """
    if launcher == 'none' or torch.cuda.is_available():
        return None
    env_cfg = cfg.setdefault('env_cfg', {})
    dist_cfg = env_cfg.setdefault('dist_cfg', {})
    dist_cfg['backend'] = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg') or dict(
        type='MMDistributedDataParallel',
        broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False),
    )
    wrapper['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper
    num_sync_bn = _sync_bn_to_bn(cfg.model)
    if not torch.distributed.is_initialized():
        if launcher == 'slurm':
            _slurm_env()
        elif launcher != 'pytorch':
            raise InputError(
                f'launcher {launcher!r} is not supported without CUDA; use '
                "'pytorch' (torchrun) or 'slurm'"
            )
        kwargs: Dict = {}
        if dist_cfg.get('timeout') is not None:
            import datetime

            kwargs['timeout'] = datetime.timedelta(seconds=dist_cfg['timeout'])
        torch.distributed.init_process_group(backend='gloo', **kwargs)
    note = 'no CUDA: distributed backend gloo, model on the CPU'
    if num_sync_bn:
        note += f', {num_sync_bn} SyncBN config(s) changed to BN'
    return note


def _slurm_env() -> None:
    """Set torch.distributed's env:// variables from slurm's, as mmengine."""
    import subprocess

    nodes = os.environ['SLURM_NODELIST']
    os.environ.setdefault('MASTER_PORT', '29500')
    if 'MASTER_ADDR' not in os.environ:
        os.environ['MASTER_ADDR'] = subprocess.getoutput(
            f'scontrol show hostname {nodes} | head -n1'
        )
    os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
    os.environ['RANK'] = os.environ['SLURM_PROCID']
    os.environ['LOCAL_RANK'] = os.environ.get('SLURM_LOCALID', '0')


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------
def _model_state_dict(checkpoint: Mapping) -> Mapping:
    for key in ('state_dict', 'model'):
        if isinstance(checkpoint.get(key), Mapping):
            return checkpoint[key]
    return checkpoint


def _listing(keys: List[str], limit: int = 8) -> str:
    shown = ', '.join(keys[:limit])
    more = f', ... ({len(keys)} in all)' if len(keys) > limit else ''
    return shown + more


def check_checkpoint(model: torch.nn.Module, filename: str) -> None:
    """Check that a checkpoint's weights are exactly those of ``model``.

    The checkpoint is loaded (``weights_only``, on the CPU) into the model:
    the load-time hooks run (a ``pos_embed`` of another grid is resized, as
    it would be when the Runner loads it), then missing and unexpected keys
    and shape mismatches are reported. A checkpoint of another backbone or
    arch fails here instead of being loaded with a warning and tested with
    random weights.

    Args:
        model (nn.Module): The model (wrappers are unwrapped).
        filename (str): A local path or any URL mmengine can load.

    Raises:
        InputError: If the file is missing or the keys or shapes differ,
            naming them.
    """
    from mmengine.model import is_model_wrapper
    from mmengine.runner.checkpoint import _load_checkpoint

    if '://' not in filename and not osp.isfile(filename):
        raise InputError(f'checkpoint {filename!r} does not exist')
    if is_model_wrapper(model):
        model = model.module
    checkpoint = _load_checkpoint(filename, map_location='cpu')
    if not isinstance(checkpoint, Mapping):
        raise InputError(f'{filename!r} holds no state dict')
    state_dict = {
        (k[len('module.') :] if k.startswith('module.') else k): v
        for k, v in _model_state_dict(checkpoint).items()
    }
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except (RuntimeError, ValueError) as e:  # shapes; pos_embed resizing
        lines = [
            line.strip()
            for line in str(e).splitlines()
            if line.strip().startswith('size mismatch')
        ]
        raise InputError(
            f'checkpoint {filename!r} does not fit the model of the config: '
            + ('; '.join(lines[:8]) or str(e))
            + (f' ... ({len(lines)} in all)' if len(lines) > 8 else '')
        ) from None
    missing = [
        k for k in result.missing_keys if not k.endswith('num_batches_tracked')
    ]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        details = []
        if missing:
            details.append(f'missing keys: {_listing(missing)}')
        if unexpected:
            details.append(f'unexpected keys: {_listing(unexpected)}')
        raise InputError(
            f'checkpoint {filename!r} does not match the model of the config '
            f'(is it for another backbone or arch?); ' + '; '.join(details)
        )
