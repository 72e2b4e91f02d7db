"""Test a detector (mmdet config) or a segmentor (mmseg config).

The config's ``default_scope`` decides which toolbox runs it. The
checkpoint must hold exactly the weights of the config's model: one of
another backbone or arch is refused, naming the keys that do not match.
Examples::

    python tools/test.py configs/mask_rcnn/<config>.py model.pth
    python tools/test.py <config>.py model.pth --out results.pkl
    bash tools/dist_test.sh <config>.py model.pth 8
"""

from mmengine.config import Config

import mmssm  # noqa: F401  (allow-lists mmengine checkpoint types)
from mmssm.utils import cli
from mmssm.utils.setup_env import InputError, check_checkpoint, config_task


def _add_arguments(parser) -> None:
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


def parse_args(argv=None):
    return cli.parse_tool_args(
        argv,
        description=__doc__.splitlines()[0],
        config_help='test config file path',
        work_dir_help='where to save the metrics',
        cfg_options_help='override config settings, key=value',
        add_arguments=_add_arguments,
    )


def build_cfg(args) -> Config:
    """The config after the command line; raises InputError on bad input."""
    cfg = cli.load_config(
        args.config,
        args.launcher,
        args.cfg_options,
        args.work_dir,
        checkpoint=args.checkpoint,
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


def main(argv=None) -> None:
    args = parse_args(argv)
    with cli.exit_on_input_error():
        cfg = build_cfg(args)
        task, _ = cli.prepare_run(cfg, 'test', args.launcher)
    runner = cli.build_runner(cfg, args.config)
    with cli.exit_on_input_error():
        check_checkpoint(runner.model, args.checkpoint)
    if args.out is not None and task == 'mmdet':
        from mmdet.evaluation import DumpDetResults

        runner.test_evaluator.metrics.append(
            DumpDetResults(out_file_path=args.out)
        )
    runner.test()
    cli.end_distributed()


if __name__ == '__main__':
    main()
