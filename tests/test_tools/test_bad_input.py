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


class _RunsCode:
    """Pickles as a call of ``os.system``: what a malicious file holds."""

    def __reduce__(self):
        import os

        return (os.system, ('echo pwned > pwned.txt',))


def _bad_checkpoints(folder) -> dict:
    """{kind: path} of checkpoints that must be refused, and the texts."""
    import torch

    good = folder / 'good.pth'
    torch.save(dict(state_dict=dict(w=torch.zeros(1000))), good)
    data = good.read_bytes()
    files = dict(
        text=(b'not a checkpoint\n', 'is not a PyTorch checkpoint (17 bytes'),
        empty=(b'', 'is empty (0 bytes)'),
        truncated=(
            data[: len(data) // 2],
            f'is truncated or corrupt ({len(data) // 2} bytes',
        ),
    )
    out = {}
    for kind, (content, text) in files.items():
        path = folder / f'{kind}.pth'
        path.write_bytes(content)
        out[kind] = (str(path), text)
    evil = folder / 'evil.pth'
    torch.save(dict(state_dict={}, meta=_RunsCode()), evil)
    out['code'] = (
        str(evil),
        'is refused: it holds objects that are not tensors or plain '
        'containers (posix.system); nothing in it was run',
    )
    return out


def test_read_checkpoint_one_line_errors(tmp_path, monkeypatch):
    from mmssm.errors import UserError
    from mmssm.utils.checkpoint import check_checkpoint, read_checkpoint

    monkeypatch.chdir(tmp_path)
    for kind, (path, text) in _bad_checkpoints(tmp_path).items():
        for read in (read_checkpoint, check_checkpoint):
            with pytest.raises(UserError) as info:
                read(path)
            message = str(info.value)
            assert text in message and repr(path) in message, kind
            assert '\n' not in message and 'weights_only=False' not in message
    assert not (tmp_path / 'pwned.txt').exists()
    assert read_checkpoint(str(tmp_path / 'good.pth'))['state_dict']


@pytest.mark.parametrize('kind', ['text', 'code'])
def test_test_refuses_bad_checkpoints(tools, tmp_path, kind):
    path, text = _bad_checkpoints(tmp_path)[kind]
    result = tools.run(
        ['tools/test.py', tools.mini_cfg, path, '--work-dir', str(tmp_path)]
    )
    _assert_refused(result, f'error: checkpoint: checkpoint {path!r}', text)
    assert 'Traceback' not in result.stderr
    assert 'weights_only=False' not in result.stderr
    assert not (tmp_path / 'pwned.txt').exists()


@pytest.mark.parametrize(
    'option', ['--resume', 'load_from', 'last_checkpoint']
)
def test_train_refuses_bad_checkpoints(tools, tmp_path, option):
    kind = dict(load_from='code').get(option, 'truncated')
    path, text = _bad_checkpoints(tmp_path)[kind]
    work_dir = tmp_path / 'work'
    args = ['tools/train.py', tools.mini_cfg, '--work-dir', str(work_dir)]
    if option == '--resume':
        args += ['--resume', path]
    elif option == 'load_from':
        args += ['--cfg-options', f'load_from={path}']
    else:  # --resume (auto) from what last_checkpoint names
        work_dir.mkdir()
        (work_dir / 'last_checkpoint').write_text(path)
        args += ['--resume']
    result = tools.run(args)
    key = dict(last_checkpoint='--resume (from last_checkpoint)').get(
        option, option
    )
    _assert_refused(result, f'error: {key}: checkpoint {path!r}', text)
    assert 'Traceback' not in result.stderr


def test_demo_refuses_an_image_its_resize_would_empty(tools):
    """7 x 3000 fitted into the synthetic config's 128 x 128: 0 rows."""
    import numpy as np
    from mmengine.config import Config

    from mmssm.errors import UserError

    demo = tools.load_script('demo/image_demo.py')
    cfg = Config.fromfile(
        f'{tools.root}/configs/mask_rcnn/mask-rcnn_plainmamba-l1-prune_'
        'adapter-fpn_1xb4-synthetic_coco-shapes.py'
    )
    with pytest.raises(UserError) as info:
        demo.check_image_size(cfg, np.zeros((7, 3000, 3), np.uint8), 'x.png')
    assert str(info.value) == (
        "image 'x.png' (3000x7 pixels) is too elongated for the config's "
        'test pipeline: fitted into (128, 128) it would be 128x0 pixels'
    )
    demo.check_image_size(cfg, np.zeros((30, 3000, 3), np.uint8), 'y.png')


def test_train_names_a_zero_byte_image(tools, tmp_path):
    """Found by the cheap data check every training run makes (no decoding),
    not by OpenCV inside the data loader."""
    import shutil

    data = tmp_path / 'coco'
    shutil.copytree(f'{tools.root}/data/coco_persons_mini', data)
    (data / 'val2017' / '000000040083.jpg').write_bytes(b'')
    result = tools.run(
        [
            'tools/train.py',
            tools.mini_cfg,
            '--work-dir',
            str(tmp_path / 'work'),
            '--cfg-options',
            f'train_dataloader.dataset.data_root={data}/',
        ]
    )
    _assert_refused(
        result,
        'error: 1 bad sample(s) in train_dataloader',
        f"image '{data}/val2017/000000040083.jpg' (image id 40083): "
        'the file is empty (0 bytes)',
    )
    assert 'Traceback' not in result.stderr
