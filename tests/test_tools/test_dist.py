"""tools/dist_train.sh and tools/dist_test.sh: 2 processes, gloo, CPU."""

import mmssm  # noqa: F401  (allow-lists mmengine checkpoint types)


def test_two_process_train_and_test(tools, dist, tmp_path):
    work_dir = tmp_path / 'work'
    result = dist.run(
        [
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
        ]
    )
    tools.check_ok(result)
    log = result.stdout + result.stderr
    dist.check_log(log)
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
