"""Train a detector (mmdet config) or a segmentor (mmseg config).

The config's ``default_scope`` decides which toolbox runs it. Examples::

    python tools/train.py configs/mask_rcnn/<config>.py
    python tools/train.py <config>.py --resume            # latest checkpoint
    python tools/train.py <config>.py --resume work_dirs/x/iter_100.pth
    bash tools/dist_train.sh <config>.py 8                # 8 processes
"""

import argparse
import os
import os.path as osp
import sys
import traceback

from mmengine.config import Config, DictAction
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

import mmssm  # noqa: F401  (allow-lists mmengine checkpoint types)
from mmssm.utils.setup_env import (
    InputError,
    check_data_paths,
    check_pretrained,
    config_task,
    register_modules,
    setup_cpu_distributed,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='where to save logs and models')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from this checkpoint; without a path, from the latest '
        'checkpoint in the work directory',
    )
    parser.add_argument(
        '--amp',
        action='store_true',
        help='automatic mixed precision (needs a CUDA device)',
    )
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='scale the lr by the actual batch size / auto_scale_lr.'
        'base_batch_size',
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
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def build_cfg(args) -> Config:
    """The config after the command line; raises InputError on bad input."""
    if not osp.isfile(args.config):
        raise InputError(f'config file {args.config!r} does not exist')
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    # work_dir: command line > config > ./work_dirs/<config name>
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join(
            './work_dirs', osp.splitext(osp.basename(args.config))[0]
        )
    if args.amp:
        import torch

        if not torch.cuda.is_available():
            raise InputError('--amp needs a CUDA device')
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise InputError(
                '--auto-scale-lr needs auto_scale_lr.base_batch_size in '
                'the config'
            )
        cfg.auto_scale_lr.enable = True
    # --resume: a path resumes from it, 'auto' from the latest checkpoint
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise InputError(f'--resume: {args.resume!r} does not exist')
        cfg.resume = True
        cfg.load_from = args.resume
    return cfg


def build_runner(cfg: Config) -> Runner:
    """The Runner of the config (``runner_type`` if it names one)."""
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        cfg = build_cfg(args)
        register_modules(config_task(cfg))
        check_data_paths(cfg, 'train')
        check_pretrained(cfg)
        note = setup_cpu_distributed(cfg, args.launcher)
    except InputError as e:
        sys.exit(f'error: {e}')
    try:
        runner = build_runner(cfg)
    except (ValueError, TypeError, KeyError) as e:  # mostly config errors
        traceback.print_exc()
        sys.exit(
            f'error: the config {args.config!r} does not build: '
            f'{type(e).__name__}: {e}'
        )
    if note:
        print_log(note, logger='current')
    runner.train()


if __name__ == '__main__':
    main()
