"""Benchmark the reliability work: CPU threads of 2 processes, resume time.

Two measurements, each as rows side by side in one run, on the synthetic
shapes config (the main job's detector: PlainMamba-L1 pruned, ViT-Adapter,
Mask R-CNN) and a small synthetic set (16 training images, 128 x 128):

``threads``: seconds per iteration of 2-process CPU training
(``tools/dist_train.sh``) with ``OMP_NUM_THREADS`` set to the number of
usable cores (the setting of the issue), under mmengine's Runner (every
process runs that many threads) and under ``mmssm.Runner`` (each process is
capped at its share of the cores). The median of the iterations after the
first two.

``resume``: wall time of ``tools/train.py`` from start to exit for a fresh
2-iteration run, and for 2 iterations resumed from a checkpoint at
iteration ``--resume-at`` (20,000 by default), with mmssm's resume (the
sampler is advanced, no data is loaded) and, at ``--plain-at`` (a smaller
iteration, since it loads every skipped batch), with mmengine's own
(``default_hooks.resume.fast_skip=False``), whose cost grows linearly
with the iteration.

Example::

    python tools/analysis_tools/benchmark_reliability.py --what threads resume
"""

import argparse
import json
import os
import os.path as osp
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import torch

from mmssm.utils.fileio import atomic_open, atomic_write

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = osp.join(
    'configs',
    'mask_rcnn',
    'mask-rcnn_plainmamba-l1-prune_adapter-fpn_1xb4-synthetic_coco-shapes.py',
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--what',
        nargs='+',
        choices=['threads', 'resume'],
        default=['threads', 'resume'],
    )
    parser.add_argument(
        '--iters',
        type=int,
        default=6,
        help='training iterations of the threads rows. Defaults to 6.',
    )
    parser.add_argument('--resume-at', type=int, default=20000)
    parser.add_argument('--plain-at', type=int, default=500)
    parser.add_argument('--out', help='also write the rows to this JSON file')
    return parser.parse_args()


def _options(data: str, extra: Dict[str, object]) -> List[str]:
    options = {
        'train_dataloader.dataset.data_root': data,
        'val_dataloader.dataset.data_root': data,
        'test_dataloader.dataset.data_root': data,
        'val_evaluator.ann_file': f'{data}/annotations/instances_val.json',
        'test_evaluator.ann_file': f'{data}/annotations/instances_val.json',
        'default_hooks.logger.interval': 1,
        'log_processor.window_size': 1,
        **extra,
    }
    return ['--cfg-options'] + [f'{k}={v}' for k, v in options.items()]


def _run(args: List[str], env: Dict[str, str]) -> float:
    """Run a command from the repository root; its wall time in seconds."""
    full_env = dict(os.environ, PYTHONPATH=ROOT, **env)
    start = time.perf_counter()
    result = subprocess.run(
        args, cwd=ROOT, env=full_env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(
            f'{" ".join(args[:3])} failed:\n{result.stderr[-3000:]}'
        )
    return seconds


def _iteration_times(work_dir: str) -> List[float]:
    """The 'time' of each logged iteration (scalars.json of the run)."""
    times = []
    for root, _, files in os.walk(work_dir):
        if 'scalars.json' in files:
            with open(osp.join(root, 'scalars.json')) as f:
                times += [
                    json.loads(line)['time']
                    for line in f
                    if '"time"' in line and '"loss"' in line
                ]
    return times


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


def bench_threads(data: str, tmp: str, iters: int) -> List[dict]:
    cores = len(os.sched_getaffinity(0))
    rows = []
    for runner in ('Runner', 'mmssm.Runner'):
        work_dir = osp.join(tmp, f'threads-{runner}')
        extra = {
            'runner_type': runner,
            'train_cfg.max_iters': iters,
            'train_cfg.val_interval': iters + 1,
            'default_hooks.checkpoint.interval': iters + 1,
        }
        wall = _run(
            [
                'bash',
                'tools/dist_train.sh',
                CONFIG,
                '2',
                '--work-dir',
                work_dir,
                *_options(data, extra),
            ],
            dict(
                PYTHON=sys.executable,
                OMP_NUM_THREADS=str(cores),
                PORT=_free_port(),
            ),
        )
        times = _iteration_times(work_dir)[2:]
        rows.append(
            dict(
                what='threads',
                runner=runner,
                omp_num_threads=cores,
                seconds_per_iter=statistics.median(times),
                iters_timed=len(times),
                wall_seconds=wall,
            )
        )
    return rows


def _checkpoint_at(data: str, tmp: str, at: int) -> str:
    """A 2-iteration checkpoint whose counters say iteration ``at``."""
    work_dir = osp.join(tmp, 'seed')
    ckpt = osp.join(work_dir, 'iter_2.pth')
    if not osp.isfile(ckpt):
        _train(data, work_dir, 2, [])
    checkpoint = torch.load(ckpt, map_location='cpu', weights_only=True)
    checkpoint['meta']['iter'] = at
    checkpoint['resume']['batches'] = at
    out = osp.join(tmp, f'iter_{at}.pth')
    with atomic_open(out) as f:
        torch.save(checkpoint, f)
    return out


def _train(
    data: str, work_dir: str, max_iters: int, more: List[str], **options
) -> float:
    extra = {
        'train_cfg.max_iters': max_iters,
        'train_cfg.val_interval': max_iters + 1,
        'default_hooks.checkpoint.interval': max_iters,
        'param_scheduler': '[]',
        **options,
    }
    args = [sys.executable, 'tools/train.py', CONFIG, '--work-dir', work_dir]
    return _run(args + more + _options(data, extra), {})


def bench_resume(data: str, tmp: str, at: int, plain_at: int) -> List[dict]:
    rows = []
    wall = _train(data, osp.join(tmp, 'fresh'), 2, [])
    rows.append(dict(what='resume', run='fresh, 2 iterations', seconds=wall))
    for start, fast in ((at, True), (plain_at, False)):
        ckpt = _checkpoint_at(data, tmp, start)
        options = {} if fast else {'default_hooks.resume.fast_skip': False}
        work_dir = osp.join(tmp, f'resume-{start}')
        wall = _train(data, work_dir, start + 2, ['--resume', ckpt], **options)
        how = 'mmssm (sampler advanced)' if fast else 'mmengine (loads)'
        rows.append(
            dict(
                what='resume',
                run=f'resumed at {start}, 2 iterations, {how}',
                seconds=wall,
            )
        )
    return rows


def main():
    args = parse_args()
    from mmssm.datasets import make_synthetic_coco

    print(
        f'machine: {platform.processor() or platform.machine()}, '
        f'{len(os.sched_getaffinity(0))} usable cores, '
        f'load average {os.getloadavg()[0]:.2f} at start, torch '
        f'{torch.__version__}'
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = osp.join(tmp, 'shapes')
        make_synthetic_coco(data, num_train=16, num_val=2, image_size=128)
        if 'threads' in args.what:
            rows += bench_threads(data, tmp, args.iters)
        if 'resume' in args.what:
            rows += bench_resume(data, tmp, args.resume_at, args.plain_at)
    for row in rows:
        if row['what'] == 'threads':
            print(
                f'threads | {row["runner"]:<13} | OMP_NUM_THREADS='
                f'{row["omp_num_threads"]} | {row["seconds_per_iter"]:.2f} '
                f's/iter (median of {row["iters_timed"]})'
            )
        else:
            print(f'resume  | {row["run"]:<50} | {row["seconds"]:.1f} s')
    print(f'load average {os.getloadavg()[0]:.2f} at the end')
    if args.out:
        atomic_write(args.out, json.dumps(rows, indent=1) + '\n')


if __name__ == '__main__':
    main()
