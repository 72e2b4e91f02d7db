"""tools/train.py and tools/test.py fail clearly, before any training.

The rule: a user error (a missing file, a config value a module refuses)
ends a tool with one line, ``error: <message>`` naming the file or the
setting, and exit status 1, without a traceback; anything else (a bug,
or a config that mmengine cannot build for another reason) ends it with
its traceback.
"""

import pytest

BB = 'model.backbone.backbone'


def _assert_refused(result, *texts):
    log = result.stdout + result.stderr
    assert result.returncode == 1, log[-3000:]
    for text in texts:
        assert text in result.stderr, result.stderr[-3000:]
    assert 'Epoch(train)' not in log and 'Epoch(test)' not in log


@pytest.mark.parametrize('tool', ['train', 'test'])
def test_missing_config(tools, tool, tmp_path):
    args = [f'tools/{tool}.py', 'configs/mask_rcnn/no_such_config.py']
    if tool == 'test':
        ckpt = tmp_path / 'model.pth'
        ckpt.write_bytes(b'')
        args.append(str(ckpt))
    result = tools.run(args)
    _assert_refused(
        result,
        "error: config file 'configs/mask_rcnn/no_such_config.py' does not "
        'exist',
    )
    assert 'Traceback' not in result.stderr


def test_missing_data_root(tools, tmp_path):
    result = tools.run(
        [
            'tools/train.py',
            tools.mini_cfg,
            '--work-dir',
            str(tmp_path),
            '--cfg-options',
            'train_dataloader.dataset.data_root=data/no_such_dir/',
        ]
    )
    _assert_refused(
        result,
        'error: missing data',
        "train_dataloader.dataset.data_root: directory 'data/no_such_dir/' "
        'does not exist',
    )
    assert 'Traceback' not in result.stderr


def test_missing_annotation_file_in_test(tools, tmp_path):
    ckpt = tmp_path / 'model.pth'
    ckpt.write_bytes(b'')
    result = tools.run(
        [
            'tools/test.py',
            tools.mini_cfg,
            str(ckpt),
            '--work-dir',
            str(tmp_path),
            '--cfg-options',
            'test_dataloader.dataset.ann_file=annotations/x.json',
            'test_evaluator.ann_file=data/coco_persons_mini/x.json',
        ]
    )
    _assert_refused(
        result,
        "test_dataloader.dataset.ann_file: file 'data/coco_persons_mini/"
        "annotations/x.json' does not exist",
        "test_evaluator.ann_file: file 'data/coco_persons_mini/x.json' does "
        'not exist',
    )


def test_unknown_arch(tools, tmp_path):
    result = tools.run(
        [
            'tools/train.py',
            tools.mini_cfg,
            '--work-dir',
            str(tmp_path),
            '--cfg-options',
            f'{BB}.arch=l9',
        ]
    )
    _assert_refused(
        result,
        f"error: the config '{tools.mini_cfg}' does not build: arch 'l9' "
        'is not one of',
    )
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and "arch 'l9'" in last
    assert 'Traceback' not in result.stderr


def test_other_errors_keep_their_traceback(tools, tmp_path):
    result = tools.run(
        [
            'tools/train.py',
            tools.mini_cfg,
            '--work-dir',
            str(tmp_path),
            '--cfg-options',
            f'{BB}.no_such_argument=1',
        ]
    )
    log = result.stdout + result.stderr
    assert result.returncode == 1, log[-3000:]
    assert 'Traceback (most recent call last)' in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('TypeError: ') and 'no_such_argument' in last
    assert not any(
        line.startswith('error: ') for line in result.stderr.splitlines()
    )
    assert 'Epoch(train)' not in log


def test_missing_pretrained_checkpoint(tools, tmp_path):
    result = tools.run(
        [
            'tools/train.py',
            tools.mini_cfg,
            '--work-dir',
            str(tmp_path),
            '--cfg-options',
            f'{BB}.init_cfg._delete_=True',
            f'{BB}.init_cfg.type=Pretrained',
            f'{BB}.init_cfg.checkpoint=checkpoints/no_such_file.pth',
        ]
    )
    _assert_refused(
        result,
        'error: missing pretrained weights',
        f"{BB}.init_cfg.checkpoint: file 'checkpoints/no_such_file.pth' "
        'does not exist',
    )
