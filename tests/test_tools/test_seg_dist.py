"""tools/dist_train.sh and tools/dist_test.sh with an mmseg config.

The mini ADE20K config, CPU-sized, on 2 processes (gloo without CUDA), as
tests/test_tools/test_dist.py does for the detection configs.
"""

import mmssm  # noqa: F401  (allow-lists mmengine checkpoint types)


def test_two_process_seg_train_and_test(tools, dist, tmp_path):
    work_dir = tmp_path / 'work'
    result = dist.run(
        [
            'tools/dist_train.sh',
            tools.seg_cfg,
            '2',
            '--work-dir',
            str(work_dir),
            *tools.cfg_options(tools.seg_2_iters),
        ]
    )
    tools.check_ok(result)
    log = result.stdout + result.stderr
    dist.check_log(log)
    assert 'Iter(train) [2/2]' in log
    # validation of the 3 images on 2 processes (2 iterations each)
    assert 'Iter(val) [2/2]' in log and 'mIoU:' in log
    checkpoint = dist.load_checkpoint(work_dir / 'iter_2.pth')
    assert checkpoint['meta']['iter'] == 2

    result = dist.run(
        [
            'tools/dist_test.sh',
            tools.seg_cfg,
            str(work_dir / 'iter_2.pth'),
            '2',
            '--work-dir',
            str(tmp_path / 'test'),
            *tools.cfg_options(tools.seg_shrink),
        ]
    )
    tools.check_ok(result)
    log = result.stdout + result.stderr
    assert 'Iter(test) [2/2]' in log  # 3 images over 2 processes
    assert 'per class results:' in log and 'mIoU:' in log
