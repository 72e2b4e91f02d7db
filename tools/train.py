"""Train a detector (mmdet config) or a segmentor (mmseg config).

The config's ``default_scope`` decides which toolbox runs it. Examples::

    python tools/train.py configs/mask_rcnn/<config>.py
    python tools/train.py <config>.py --resume            # latest checkpoint
    python tools/train.py <config>.py --resume work_dirs/x/iter_100.pth
    bash tools/dist_train.sh <config>.py 8                # 8 processes
"""

import os.path as osp

from mmengine.config import Config
from mmengine.logging import print_log

import mmssm  # noqa: F401  (allow-lists mmengine checkpoint types)
from mmssm.utils import cli
from mmssm.utils.setup_env import InputError


def _add_arguments(parser) -> None:
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


def parse_args(argv=None):
    return cli.parse_tool_args(
        argv,
        description=__doc__.splitlines()[0],
        config_help='train config file path',
        work_dir_help='where to save logs and models',
        cfg_options_help='override config settings, key=value (e.g. '
        'train_cfg.max_epochs=1 model.backbone.backbone.arch=l2)',
        add_arguments=_add_arguments,
    )


def build_cfg(args) -> Config:
    """The config after the command line; raises InputError on bad input."""
    cfg = cli.load_config(
        args.config, args.launcher, args.cfg_options, args.work_dir
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


def main(argv=None) -> None:
    args = parse_args(argv)
    with cli.exit_on_input_error():
        cfg = build_cfg(args)
        _, note = cli.prepare_run(cfg, 'train', args.launcher)
    runner = cli.build_runner(cfg, args.config)
    if note:
        print_log(note, logger='current')
    runner.train()
    cli.end_distributed()


if __name__ == '__main__':
    main()
