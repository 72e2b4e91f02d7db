"""Test a detector (mmdet config) or a segmentor (mmseg config).

The config's ``default_scope`` decides which toolbox runs it. The
checkpoint must hold exactly the weights of the config's model: one of
another backbone or arch is refused, naming the keys that do not match.
Examples::

    python tools/test.py configs/mask_rcnn/<config>.py model.pth
    python tools/test.py <config>.py model.pth --out results.pkl
    bash tools/dist_test.sh <config>.py model.pth 8
"""

import argparse
import os
import os.path as osp
import sys
import traceback

from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

import mmssm  # noqa: F401  (allow-lists mmengine checkpoint types)
from mmssm.utils.setup_env import (
    InputError,
    check_checkpoint,
    check_data_paths,
    config_task,
    register_modules,
    setup_cpu_distributed,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='where to save the metrics')
    parser.add_argument(
        '--out',
        help='mmdet: dump the predictions to this .pkl file; mmseg: save '
        'the predicted label maps to this directory',
    )
    parser.add_argument(
        '--show-dir',
        help='save images with the predictions drawn to this directory '
        '(mmdet: inside the work dir/timestamp)',
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, key=value',
    )
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm'],
        default='none',
        help='job launcher',
    )
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def build_cfg(args) -> Config:
    """The config after the command line; raises InputError on bad input."""
    if not osp.isfile(args.config):
        raise InputError(f'config file {args.config!r} does not exist')
    if '://' not in args.checkpoint and not osp.isfile(args.checkpoint):
        raise InputError(f'checkpoint {args.checkpoint!r} does not exist')
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
    cfg.load_from = args.checkpoint
    task = config_task(cfg)
    if args.show_dir:
        hook = cfg.default_hooks.get('visualization')
        if hook is None:
            raise InputError(
                '--show-dir needs default_hooks.visualization in the config'
            )
        hook['draw'] = True
        hook['interval'] = 1  # every image, not every 50th
        if task == 'mmdet':
            hook['test_out_dir'] = args.show_dir
        else:
            cfg.visualizer['save_dir'] = args.show_dir
    if args.out is not None:
        if task == 'mmdet':
            if not args.out.endswith(('.pkl', '.pickle')):
                raise InputError('--out must be a .pkl file for mmdet')
        else:
            cfg.test_evaluator['output_dir'] = args.out
            cfg.test_evaluator['keep_results'] = True
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
        task = config_task(cfg)
        register_modules(task)
        check_data_paths(cfg, 'test')
        setup_cpu_distributed(cfg, args.launcher)
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
    try:
        check_checkpoint(runner.model, args.checkpoint)
    except InputError as e:
        sys.exit(f'error: {e}')
    if args.out is not None and task == 'mmdet':
        from mmdet.evaluation import DumpDetResults

        runner.test_evaluator.metrics.append(
            DumpDetResults(out_file_path=args.out)
        )
    runner.test()


if __name__ == '__main__':
    main()
