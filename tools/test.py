"""Test a detector (mmdet), segmentor (mmseg) or classifier (mmpretrain).

The config's ``default_scope`` decides which toolbox runs it. The
checkpoint must hold exactly the weights of the config's model: one of
another backbone or arch is refused, naming the keys that do not match.
Examples::

    python tools/test.py configs/mask_rcnn/<config>.py model.pth
    python tools/test.py <config>.py model.pth --out results.pkl
    bash tools/dist_test.sh <config>.py model.pth 8
"""

import os
import os.path as osp
from typing import Sequence

import numpy as np
from mmengine.config import Config
from mmengine.evaluator import BaseMetric
from PIL import Image

import mmssm  # noqa: F401  (allow-lists mmengine checkpoint types)
from mmssm.errors import UserError
from mmssm.utils.checkpoint import check_checkpoint, load_checkpoint_strict
from mmssm.utils.cli import (
    build_runner,
    exit_on_user_error,
    load_config,
    runner_parser,
)
from mmssm.utils.distributed import end_distributed, setup_cpu_distributed
from mmssm.utils.fileio import ATOMIC_BACKEND_ARGS, atomic_open
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


class SegMapWriter(BaseMetric):
    """mmseg ``--out``: each predicted label map written whole, as a PNG.

    mmseg's ``IoUMetric(output_dir=...)`` saves the maps straight onto
    their final paths; here each goes through a temporary file. The values
    are those of the label files (+1 with ``reduce_zero_label``), as
    mmseg's.

    Args:
        out_dir (str): The folder of the maps (made if missing).
    """

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            pred = sample['pred_sem_seg']['data'].squeeze().cpu().numpy()
            if sample.get('reduce_zero_label', False):
                pred = pred + 1
            name = osp.splitext(osp.basename(sample['img_path']))[0]
            with atomic_open(osp.join(self.out_dir, f'{name}.png')) as f:
                Image.fromarray(pred.astype(np.uint8)).save(f, format='PNG')
            self.results.append(name)

    def compute_metrics(self, results: list) -> dict:
        return {}


def dump_results(task: str, out_file: str) -> BaseMetric:
    """The ``--out`` metric of mmdet/mmpretrain, writing the file whole."""
    from mmengine.fileio import dump
    from mmengine.logging import print_log

    if task == 'mmdet':  # masks as RLE, as mmdet's test.py writes them
        from mmdet.evaluation import DumpDetResults as DumpResults
    else:
        from mmengine.evaluator import DumpResults

    class AtomicDumpResults(DumpResults):
        def compute_metrics(self, results: list) -> dict:
            # DumpResults.compute_metrics, through the atomic backend
            dump(results, self.out_file_path, backend_args=ATOMIC_BACKEND_ARGS)
            print_log(f'Results has been saved to {self.out_file_path}.')
            return {}

    return AtomicDumpResults(out_file_path=out_file)


def build_cfg(args) -> Config:
    """The config after the command line."""
    cfg = load_config(args)
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
        if task != 'mmseg' and not args.out.endswith(('.pkl', '.pickle')):
            raise UserError(f'--out must be a .pkl file for {task}')
    return cfg


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = build_cfg(args)
    check_data_paths(cfg, 'test')
    check_checkpoint(args.checkpoint, 'checkpoint')
    setup_cpu_distributed(cfg, args.launcher)
    runner = build_runner(cfg, args.config)
    load_checkpoint_strict(runner.model, args.checkpoint)
    task = config_task(cfg)
    if args.out is not None:
        runner.test_evaluator.metrics.append(
            SegMapWriter(args.out)
            if task == 'mmseg'
            else dump_results(task, args.out)
        )
    runner.test()
    end_distributed()


if __name__ == '__main__':
    main()
