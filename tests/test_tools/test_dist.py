"""tools/dist_train.sh and tools/dist_test.sh: 2 processes, gloo, CPU."""

import socket
import sys

import pytest
import torch

import mmssm  # noqa: F401  (allow-lists mmengine checkpoint types)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    not torch.distributed.is_available()
    or not torch.distributed.is_gloo_available(),
    reason='torch.distributed with gloo is needed',
)
def test_two_process_train_and_test(tools, tmp_path):
    work_dir = tmp_path / 'work'
    env = dict(PYTHON=sys.executable, OMP_NUM_THREADS='1')
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
        env=dict(env, PORT=str(_free_port())),
    )
    tools.check_ok(result)
    log = result.stdout + result.stderr
    assert 'Distributed training: True' in log
    assert 'GPU number: 2' in log  # mmengine's name for the world size
    if not torch.cuda.is_available():
        assert 'no CUDA: distributed backend gloo' in log
    # 4 images, 2 processes x 2 images: 1 iteration per epoch
    assert 'Epoch(train) [2][1/1]' in log
    checkpoint = torch.load(
        work_dir / 'epoch_2.pth', map_location='cpu', weights_only=True
    )
    assert (checkpoint['meta']['epoch'], checkpoint['meta']['iter']) == (2, 2)
    assert not any(k.startswith('module.') for k in checkpoint['state_dict'])

    result = tools.run(
        [
            'bash',
            'tools/dist_test.sh',
            tools.mini_cfg,
            str(work_dir / 'epoch_2.pth'),
            '2',
            '--work-dir',
            str(tmp_path / 'test'),
            *tools.cfg_options(tools.shrink),
        ],
        env=dict(env, PORT=str(_free_port())),
    )
    tools.check_ok(result)
    log = result.stdout + result.stderr
    assert 'Epoch(test) [2/2]' in log  # 4 images over 2 processes
    assert 'coco/bbox_mAP:' in log and 'coco/segm_mAP:' in log
