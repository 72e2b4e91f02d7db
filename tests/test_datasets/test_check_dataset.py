"""Bad data is named before a run: mmssm.utils.preflight.check_dataset,
tools/misc/check_dataset.py and tools/train.py --check-data.

The policy (README): a bad sample is an error naming the file (and the
image id), never skipped silently.
"""

import importlib.util
import os
import os.path as osp
import subprocess
import sys

import pytest
from mmengine.config import Config

from mmssm.datasets import make_synthetic_coco, write_synthetic_cls
from mmssm.utils.preflight import check_dataset

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DET = osp.join(
    ROOT,
    'configs/mask_rcnn/mask-rcnn_plainmamba-l1-prune_adapter-fpn_1xb4-'
    'synthetic_coco-shapes.py',
)
CLS = osp.join(
    ROOT,
    'configs/plainmamba/plainmamba-l1-prune_1xb16-10e_synthetic-cls-128.py',
)


@pytest.fixture
def shapes(tmp_path):
    out = str(tmp_path / 'shapes')
    make_synthetic_coco(out, num_train=4, num_val=2, image_size=64, seed=1)
    return out


@pytest.fixture
def glyphs(tmp_path):
    out = str(tmp_path / 'cls')
    write_synthetic_cls(out, num_train=12, num_val=6, image_size=32)
    return out


def _det_cfg(root):
    cfg = Config.fromfile(DET)
    cfg.train_dataloader.dataset.data_root = root
    return cfg


def test_empty_and_truncated_images(shapes):
    cfg = _det_cfg(shapes)
    assert check_dataset(cfg) == []
    train = osp.join(shapes, 'train')
    empty, cut = (osp.join(train, n) for n in sorted(os.listdir(train))[:2])
    open(empty, 'wb').close()
    with open(cut, 'rb') as f:
        data = f.read()
    with open(cut, 'wb') as f:
        f.write(data[: len(data) // 3])
    assert check_dataset(cfg) == [
        f'image {empty!r} (image id 1): the file is empty (0 bytes)',
        f'image {cut!r} (image id 2): the file is corrupt, truncated or not '
        'an image',
    ]
    # without decoding only the empty file is found
    assert len(check_dataset(cfg, decode=False)) == 1


def test_labels_outside_the_heads_classes(glyphs):
    cfg = Config.fromfile(CLS)
    cfg.train_dataloader.dataset.data_root = glyphs
    assert check_dataset(cfg) == []
    ann = osp.join(glyphs, 'meta', 'train.txt')
    with open(ann) as f:
        lines = f.read().splitlines()
    path, _ = lines[0].rsplit(' ', 1)
    lines[0] = f'{path} 9'
    with open(ann, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    (problem,) = check_dataset(cfg, decode=False)
    assert problem == (
        f"{osp.join(glyphs, path)!r}: label(s) [9] not in the head's 6 "
        'classes (0..5)'
    )


def test_empty_class_folder(glyphs):
    cfg = Config.fromfile(CLS)
    dataset = cfg.train_dataloader.dataset
    dataset.update(data_root=glyphs, ann_file='', data_prefix='train')
    dataset.pop('metainfo')  # the classes are the folders
    os.makedirs(osp.join(glyphs, 'train', 'zzz'))
    cfg.model.head.num_classes = 7
    assert check_dataset(cfg, decode=False) == [
        f'class folder {osp.join(glyphs, "train", "zzz")!r} has no image'
    ]


def _script(path):
    spec = importlib.util.spec_from_file_location('tool', osp.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_dataset_tool(shapes, capsys):
    tool = _script('tools/misc/check_dataset.py')
    options = ['--cfg-options', f'train_dataloader.dataset.data_root={shapes}']
    tool.main([DET, *options])
    assert 'train: no problem found' in capsys.readouterr().out
    bad = osp.join(shapes, 'train', '000003.png')
    open(bad, 'wb').close()
    with pytest.raises(SystemExit) as info:
        tool.main([DET, *options])
    assert str(info.value) == (
        'error: 1 bad sample(s) in train_dataloader:\n  '
        f'image {bad!r} (image id 4): the file is empty (0 bytes)'
    )


def test_train_refuses_bad_labels_of_a_classification_set(glyphs, tmp_path):
    ann = osp.join(glyphs, 'meta', 'train.txt')
    with open(ann) as f:
        lines = f.read().splitlines()
    lines[3] = lines[3].rsplit(' ', 1)[0] + ' 6'
    with open(ann, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    result = subprocess.run(
        [
            sys.executable,
            'tools/train.py',
            CLS,
            '--work-dir',
            str(tmp_path / 'work'),
            '--cfg-options',
            f'train_dataloader.dataset.data_root={glyphs}',
            f'val_dataloader.dataset.data_root={glyphs}',
        ],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1'),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert 'error: 1 bad sample(s) in train_dataloader' in result.stderr
    assert "label(s) [6] not in the head's 6 classes (0..5)" in result.stderr
    assert 'Traceback' not in result.stderr
