"""Train a detector (mmdet), segmentor (mmseg) or classifier (mmpretrain).

The config's ``default_scope`` decides which toolbox runs it. Examples::

    python tools/train.py configs/mask_rcnn/<config>.py
    python tools/train.py <config>.py --resume            # latest checkpoint
    python tools/train.py <config>.py --resume work_dirs/x/iter_100.pth
    bash tools/dist_train.sh <config>.py 8                # 8 processes
"""

import os.path as osp
from typing import Optional

import torch
from mmengine.config import Config
from mmengine.logging import print_log

import mmssm  # noqa: F401  (allow-lists mmengine checkpoint types)
from mmssm.errors import UserError
from mmssm.utils.checkpoint import check_checkpoint
from mmssm.utils.cli import (
    build_runner,
    exit_on_user_error,
    load_config,
    runner_parser,
)
from mmssm.utils.distributed import end_distributed, setup_cpu_distributed
from mmssm.utils.preflight import (
    check_data_paths,
    check_dataset,
    check_pretrained,
)


def parse_args(argv=None):
    parser = runner_parser(__doc__.splitlines()[0])
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from this checkpoint; without a path, from the latest '
        'checkpoint in the work directory',
    )
    parser.add_argument(
        '--check-data',
        action='store_true',
        help='before training, also decode every training image '
        '(tools/misc/check_dataset.py); without it, every image and label '
        'map is still checked to exist and be non-empty, and every label to '
        "be one of the head's classes",
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
    return parser.parse_args(argv)


def build_cfg(args) -> Config:
    """The config after the command line."""
    cfg = load_config(args)
    if args.amp:
        if not torch.cuda.is_available():
            raise UserError('--amp needs a CUDA device')
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise UserError(
                '--auto-scale-lr needs auto_scale_lr.base_batch_size in '
                'the config'
            )
        cfg.auto_scale_lr.enable = True
    # --resume: a path resumes from it, 'auto' from the latest checkpoint
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
        latest = latest_checkpoint(cfg.work_dir)
        if latest is not None:
            check_checkpoint(latest, f'--resume (from {LAST})')
    elif args.resume is not None:
        check_checkpoint(args.resume, '--resume')
        cfg.resume = True
        cfg.load_from = args.resume
    elif cfg.get('load_from'):
        check_checkpoint(cfg.load_from, 'load_from')
    return cfg


LAST = 'last_checkpoint'


def latest_checkpoint(work_dir: str) -> Optional[str]:
    """The checkpoint that ``work_dir/last_checkpoint`` names, if any.

    Raises:
        UserError: If the file is there but names no file (written by a
            run that died while writing it).
    """
    path = osp.join(work_dir, LAST)
    if not osp.isfile(path):
        return None
    with open(path) as f:
        latest = f.read().strip()
    if not latest or not osp.isfile(latest):
        raise UserError(
            f'{path!r} names no checkpoint ({latest!r}): resume from one '
            'with --resume PATH'
        )
    return latest


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = build_cfg(args)
    check_data_paths(cfg, 'train')
    # Cheap checks always (file sizes and labels, no decoding): a zero-byte
    # image otherwise fails deep in OpenCV with no file name.
    problems = check_dataset(cfg, 'train', decode=args.check_data)
    if problems:
        raise UserError(
            f'{len(problems)} bad sample(s) in train_dataloader (see '
            'tools/misc/check_dataset.py):\n  ' + '\n  '.join(problems)
        )
    check_pretrained(cfg)
    note = setup_cpu_distributed(cfg, args.launcher)
    runner = build_runner(cfg, args.config)
    if note:
        print_log(note, logger='current')
    runner.train()
    end_distributed()


if __name__ == '__main__':
    main()
