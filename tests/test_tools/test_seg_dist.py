"""tools/dist_train.sh and tools/dist_test.sh with an mmseg config.

The mini ADE20K config, CPU-sized, on 2 processes (gloo without CUDA), as
tests/test_tools/test_dist.py does for the detection configs.
"""

import importlib.util
import os.path as osp
import socket
import sys

import pytest
import torch

import mmssm  # noqa: F401  (allow-lists mmengine checkpoint types)


def _seg_tools():
    """SEG_CFG and SEG_SHRINK of test_seg_tools.py (not importable as a
    package: the tests run with --import-mode=importlib)."""
    path = osp.join(osp.dirname(osp.abspath(__file__)), 'test_seg_tools.py')
    spec = importlib.util.spec_from_file_location('_seg_tools', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    not torch.distributed.is_available()
    or not torch.distributed.is_gloo_available(),
    reason='torch.distributed with gloo is needed',
)
def test_two_process_seg_train_and_test(tools, tmp_path):
    seg = _seg_tools()
    work_dir = tmp_path / 'work'
    env = dict(PYTHON=sys.executable, OMP_NUM_THREADS='1')
    result = tools.run(
        [
            'bash',
            'tools/dist_train.sh',
            seg.SEG_CFG,
            '2',
            '--work-dir',
            str(work_dir),
            *tools.cfg_options(
                {
                    **seg.SEG_SHRINK,
                    'train_cfg.max_iters': 2,
                    'train_cfg.val_interval': 2,
                    'default_hooks.checkpoint.interval': 2,
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
    assert 'Iter(train) [2/2]' in log
    # validation of the 3 images on 2 processes (2 iterations each)
    assert 'Iter(val) [2/2]' in log and 'mIoU:' in log
    checkpoint = torch.load(
        work_dir / 'iter_2.pth', map_location='cpu', weights_only=True
    )
    assert checkpoint['meta']['iter'] == 2
    assert not any(k.startswith('module.') for k in checkpoint['state_dict'])

    result = tools.run(
        [
            'bash',
            'tools/dist_test.sh',
            seg.SEG_CFG,
            str(work_dir / 'iter_2.pth'),
            '2',
            '--work-dir',
            str(tmp_path / 'test'),
            *tools.cfg_options(seg.SEG_SHRINK),
        ],
        env=dict(env, PORT=str(_free_port())),
    )
    tools.check_ok(result)
    log = result.stdout + result.stderr
    assert 'Iter(test) [2/2]' in log  # 3 images over 2 processes
    assert 'per class results:' in log and 'mIoU:' in log
