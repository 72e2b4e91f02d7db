"""tools/dist_train.sh and tools/dist_test.sh: 2 processes, gloo, CPU."""

import os
import socket
import sys

import mmssm  # noqa: F401  (allow-lists mmengine checkpoint types)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


def test_two_process_train_and_test(tools, dist, tmp_path):
    """Training asks for 8 threads per process: each gets its share."""
    work_dir = tmp_path / 'work'
    env = dict(PYTHON=sys.executable, OMP_NUM_THREADS='8', PORT=_free_port())
    result = tools.run(
        [
            'bash',
            'tools/dist_train.sh',
            tools.mini_cfg,
            '2',
            '--work-dir',
            str(work_dir),
            *tools.cfg_options(
                {
                    **tools.shrink,
                    'train_cfg.max_epochs': 2,
                    'train_cfg.val_interval': 10,
                }
            ),
        ],
        env=env,
    )
    tools.check_ok(result)
    log = result.stdout + result.stderr
    dist.check_log(log)
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f'CPU threads per process: {share} (2 processes on' in log
    assert 'OMP_NUM_THREADS=8 is more than the share of a process' in log
    # every gradient has its parameter's layout (DDP copies none)
    assert 'Grad strides do not match bucket view strides' not in log
    # 4 images, 2 processes x 2 images: 1 iteration per epoch
    assert 'Epoch(train) [2][1/1]' in log
    checkpoint = dist.load_checkpoint(work_dir / 'epoch_2.pth')
    assert (checkpoint['meta']['epoch'], checkpoint['meta']['iter']) == (2, 2)

    result = dist.run(
        [
            'tools/dist_test.sh',
            tools.mini_cfg,
            str(work_dir / 'epoch_2.pth'),
            '2',
            '--work-dir',
            str(tmp_path / 'test'),
            *tools.cfg_options(tools.shrink),
        ]
    )
    tools.check_ok(result)
    log = result.stdout + result.stderr
    assert 'Epoch(test) [2/2]' in log  # 4 images over 2 processes
    assert 'coco/bbox_mAP:' in log and 'coco/segm_mAP:' in log
