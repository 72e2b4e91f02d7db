"""The classification path through mmpretrain: the synthetic set on disk,
tools/train.py and tools/test.py on the mini classification config, resume,
and the trained checkpoint in mmpretrain's inferencer."""

import json
import os.path as osp

import pytest
import torch

from mmssm.datasets import CLS_CLASSES, write_synthetic_cls
from mmssm.testing import TINY_PRUNE, tiny_arch

CONFIG = (
    'configs/plainmamba/plainmamba-l1-prune_1xb16-10e_synthetic-cls-128.py'
)
ARCH = tiny_arch('plainmamba', embed_dims=32)


@pytest.fixture(scope='module')
def cls_set(tmp_path_factory):
    root = tmp_path_factory.mktemp('cls') / 'set'
    assert write_synthetic_cls(str(root), 24, 12, image_size=64, seed=1)
    return str(root) + '/'


@pytest.fixture(scope='module')
def small_cfg(cls_set, tmp_path_factory, tools):
    """A config file inheriting the mini config, shrunk for the CPU."""
    path = tmp_path_factory.mktemp('cfg') / 'cls_small.py'
    path.write_text(
        f'_base_ = [{osp.join(tools.root, CONFIG)!r}]\n'
        f'data_root = {cls_set!r}\n'
        'model = dict(backbone=dict(_delete_=True, type="mmssm.PlainMamba",'
        f' arch={ARCH!r}, img_size=64, out_type="avg_featmap",'
        f' prune_cfg={TINY_PRUNE!r}),'
        f' head=dict(in_channels={ARCH["embed_dims"]}))\n'
        'train_cfg = dict(max_epochs=2)\n'
        'randomness = dict(seed=0)\n'
        + ''.join(
            f'{loader}_dataloader = '
            f'dict(dataset=dict(data_root={cls_set!r}))\n'
            for loader in ('train', 'val', 'test')
        )
    )
    return str(path)


@pytest.fixture(scope='module')
def trained(small_cfg, tmp_path_factory, tools):
    work_dir = tmp_path_factory.mktemp('work')
    proc = tools.run(
        ['tools/train.py', small_cfg, '--work-dir', str(work_dir)]
    )
    tools.check_ok(proc)
    return work_dir, proc


def test_the_set_on_disk(cls_set):
    with open(osp.join(cls_set, 'meta', 'val.txt')) as f:
        lines = f.read().splitlines()
    assert len(lines) == 12
    path, label = lines[2].split()
    assert path == f'val/{CLS_CLASSES[2]}/000002.png' and label == '2'
    assert osp.isfile(osp.join(cls_set, path))
    # the same parameters keep the set, others are refused
    assert not write_synthetic_cls(cls_set, 24, 12, image_size=64, seed=1)
    with pytest.raises(FileExistsError):
        write_synthetic_cls(cls_set, 24, 12, image_size=64, seed=2)


def test_train_logs_accuracy_and_saves(trained):
    work_dir, proc = trained
    assert osp.isfile(work_dir / 'epoch_2.pth')
    logs = sorted(work_dir.glob('*/vis_data/scalars.json'))
    records = [
        json.loads(line)
        for line in logs[-1].read_text().split('\n')
        if line.strip()
    ]
    accuracies = [r['accuracy/top1'] for r in records if 'accuracy/top1' in r]
    assert len(accuracies) == 2  # validated after each epoch
    assert all(0 <= a <= 100 for a in accuracies)
    ckpt = torch.load(work_dir / 'epoch_2.pth', weights_only=True)
    assert ckpt['meta']['pruning']['backbone']['layers'] == [2]
    assert list(ckpt['meta']['dataset_meta']['classes']) == list(CLS_CLASSES)


def test_test_py_reports_accuracy(trained, small_cfg, tools):
    work_dir, _ = trained
    out = work_dir / 'preds.pkl'
    proc = tools.run(
        ['tools/test.py', small_cfg, str(work_dir / 'epoch_2.pth'),
         '--work-dir', str(work_dir / 'test'), '--out', str(out)]
    )  # fmt: skip
    tools.check_ok(proc)
    assert 'accuracy/top1' in proc.stdout + proc.stderr
    assert out.is_file()


def test_resume_continues(trained, small_cfg, tools):
    work_dir, _ = trained
    proc = tools.run(
        ['tools/train.py', small_cfg, '--work-dir', str(work_dir),
         '--resume', str(work_dir / 'epoch_1.pth')]
    )  # fmt: skip
    tools.check_ok(proc)
    assert 'resumed epoch: 1' in (proc.stdout + proc.stderr).lower()


def test_checkpoint_in_the_inferencer(trained, small_cfg, cls_set):
    from mmpretrain.apis import ImageClassificationInferencer

    work_dir, _ = trained
    inferencer = ImageClassificationInferencer(
        small_cfg, pretrained=str(work_dir / 'epoch_2.pth'), device='cpu'
    )
    image = osp.join(cls_set, 'val', CLS_CLASSES[0], '000000.png')
    (result,) = inferencer(image)
    assert result['pred_class'] in CLS_CLASSES
    assert len(result['pred_scores']) == len(CLS_CLASSES)
