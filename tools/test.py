"""Test a detector (mmdet), segmentor (mmseg) or classifier (mmpretrain).

The config's ``default_scope`` decides which toolbox runs it. The
checkpoint must hold exactly the weights of the config's model: one of
another backbone or arch is refused, naming the keys that do not match.
Examples::

    python tools/test.py configs/mask_rcnn/<config>.py model.pth
    python tools/test.py <config>.py model.pth --out results.pkl
    bash tools/dist_test.sh <config>.py model.pth 8
"""

import os.path as osp

from mmengine.config import Config

import mmssm  # noqa: F401  (allow-lists mmengine checkpoint types)
from mmssm.errors import UserError
from mmssm.utils.checkpoint import load_checkpoint_strict
from mmssm.utils.cli import (
    build_runner,
    exit_on_user_error,
    load_config,
    runner_parser,
)
from mmssm.utils.distributed import end_distributed, setup_cpu_distributed
from mmssm.utils.preflight import check_data_paths, config_task


def parse_args(argv=None):
    parser = runner_parser(__doc__.splitlines()[0])
    parser.add_argument('checkpoint', help='checkpoint file')
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
    return parser.parse_args(argv)


def build_cfg(args) -> Config:
    """The config after the command line."""
    cfg = load_config(args)
    if '://' not in args.checkpoint and not osp.isfile(args.checkpoint):
        raise UserError(f'checkpoint {args.checkpoint!r} does not exist')
    cfg.load_from = args.checkpoint
    task = config_task(cfg)
    if args.show_dir:
        hook = cfg.default_hooks.get('visualization')
        if hook is None:
            raise UserError(
                '--show-dir needs default_hooks.visualization in the config'
            )
        hook['draw'] = True
        hook['interval'] = 1  # every image, not every 50th
        if task == 'mmseg':
            cfg.visualizer['save_dir'] = args.show_dir
        elif task == 'mmpretrain':
            hook.update(enable=True, out_dir=args.show_dir)
        else:
            hook['test_out_dir'] = args.show_dir
    if args.out is not None:
        if task == 'mmseg':
            cfg.test_evaluator['output_dir'] = args.out
            cfg.test_evaluator['keep_results'] = True
        elif not args.out.endswith(('.pkl', '.pickle')):
            raise UserError(f'--out must be a .pkl file for {task}')
    return cfg


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = build_cfg(args)
    check_data_paths(cfg, 'test')
    setup_cpu_distributed(cfg, args.launcher)
    runner = build_runner(cfg, args.config)
    load_checkpoint_strict(runner.model, args.checkpoint)
    task = config_task(cfg)
    if args.out is not None and task != 'mmseg':
        if task == 'mmdet':  # masks as RLE, as mmdet's test.py writes them
            from mmdet.evaluation import DumpDetResults as DumpResults
        else:
            from mmengine.evaluator import DumpResults
        runner.test_evaluator.metrics.append(
            DumpResults(out_file_path=args.out)
        )
    runner.test()
    end_distributed()


if __name__ == '__main__':
    main()
