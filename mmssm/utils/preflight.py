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
from typing import Iterator, List, Mapping, Optional, Tuple

import numpy as np
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


_IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif')


def _head_classes(model: Mapping) -> Optional[int]:
    """The number of classes of a config's head(s), if it names one."""
    for key, node in _nodes(model, 'model'):
        if key.endswith(('.head', '.bbox_head', '.decode_head')):
            num = node.get('num_classes')
            if isinstance(num, int):
                return num
    return None


def _file_problem(path, decode: bool) -> Optional[str]:
    """What is wrong with an image or label map file, or None."""
    if not isinstance(path, str) or '://' in path:
        return None
    if not osp.isfile(path):
        return 'the file does not exist'
    if osp.getsize(path) == 0:
        return 'the file is empty (0 bytes)'
    if decode:
        import mmcv

        with open(path, 'rb') as f:
            data = f.read()
        try:
            image = mmcv.imfrombytes(data, flag='unchanged')
        except Exception:  # any decoder failure: reported with the path
            image = None
        if image is None or image.size == 0:
            return 'the file is corrupt, truncated or not an image'
    return None


def _labels(info: Mapping) -> List[int]:
    """The class labels of a sample (classification or detection)."""
    label = info.get('gt_label')
    if label is not None:
        return [int(x) for x in np.atleast_1d(np.asarray(label))]
    return [
        int(inst['bbox_label'])
        for inst in info.get('instances') or ()
        if 'bbox_label' in inst
    ]


def _empty_class_folders(dataset_cfg: Mapping) -> List[str]:
    """mmpretrain's folder layout: class folders without an image."""
    if dataset_cfg.get('ann_file'):
        return []
    prefix = dataset_cfg.get('data_prefix') or ''
    if isinstance(prefix, Mapping):
        prefix = prefix.get('img_path') or prefix.get('img') or ''
    root = osp.join(dataset_cfg.get('data_root') or '', prefix)
    if not osp.isdir(root):
        return []
    problems = []
    for name in sorted(os.listdir(root)):
        folder = osp.join(root, name)
        if not osp.isdir(folder):
            continue
        has_image = any(
            f.lower().endswith(_IMAGE_EXTENSIONS)
            for _, _, files in os.walk(folder)
            for f in files
        )
        if not has_image:
            problems.append(f'class folder {folder!r} has no image')
    return problems


def check_dataset(
    cfg: Config, split: str = 'train', decode: bool = True, limit: int = 20
) -> List[str]:
    """Find the bad samples of a split before a run reads them.

    The dataset is built as the run builds it (without its pipeline); each
    sample's image (and label map) must exist, be non-empty and, with
    ``decode``, decode; each class label must be one of the head's classes
    (``num_classes`` of the config's head, else the dataset's classes); in
    mmpretrain's folder layout, every class folder must hold an image.

    Args:
        cfg (Config): The config.
        split (str): 'train', 'val' or 'test'. Defaults to 'train'.
        decode (bool): Decode every image (slower: reads all of them).
            Defaults to True.
        limit (int): Stop after this many problems. Defaults to 20.

    Returns:
        list[str]: One line per problem, naming the file, the image id
        where there is one and what is wrong; empty if none.

    Raises:
        UserError: If the split's data root, annotation file or image
            folder is missing.
    """
    from mmengine.registry import DATASETS, DefaultScope

    task = config_task(cfg)
    loader = cfg.get(f'{split}_dataloader')
    if not loader:
        raise UserError(f'the config has no {split}_dataloader')
    ds_cfg = Config(dict(loader['dataset'])).to_dict()
    missing = _data_problems(ds_cfg, f'{split}_dataloader.dataset')
    if missing:
        raise UserError('missing data:\n  ' + '\n  '.join(missing))
    problems = _empty_class_folders(ds_cfg)
    ds_cfg['pipeline'] = []
    with DefaultScope.overwrite_default_scope(task):
        dataset = DATASETS.build(ds_cfg)
    num_classes = _head_classes(cfg.get('model') or {})
    if num_classes is None:
        num_classes = len(dataset.metainfo.get('classes') or ()) or None
    for i in range(len(dataset)):
        if len(problems) >= limit:
            problems.append(f'... (stopped after {limit} problems)')
            break
        info = dataset.get_data_info(i)
        name = repr(str(info.get('img_path')))
        if info.get('img_id') is not None:
            name += f' (image id {info["img_id"]})'
        problem = _file_problem(info.get('img_path'), decode)
        if problem:
            problems.append(f'image {name}: {problem}')
        problem = _file_problem(info.get('seg_map_path'), decode)
        if problem:
            problems.append(
                f'label map {info["seg_map_path"]!r} of image {name}: '
                f'{problem}'
            )
        if num_classes is not None:
            bad = sorted(
                {x for x in _labels(info) if not 0 <= x < num_classes}
            )
            if bad:
                problems.append(
                    f"{name}: label(s) {bad} not in the head's "
                    f'{num_classes} classes (0..{num_classes - 1})'
                )
    return problems
