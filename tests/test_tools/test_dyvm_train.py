"""tools/train.py on the mini DyVM config (the synthetic classification
set): every loss term of DyVM is logged under its own name, the checkpoint
holds the predictors and direction gates but no teacher, and it evaluates
with the tokens physically pruned."""

import json
import os.path as osp

import pytest
import torch

from mmssm.datasets import write_synthetic_cls

CONFIG = 'configs/dyvm/dyvm_vim-mini_1xb8-2e_synthetic-cls-128.py'
LOSS_KEYS = (
    'loss_cls',
    'loss_token_ratio',
    'loss_direction_ratio',
    'loss_distill_kl',
    'loss_distill_tokens',
)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tools):
    root = str(tmp_path_factory.mktemp('cls') / 'set') + '/'
    assert write_synthetic_cls(root, 16, 8, image_size=128, seed=1)
    work_dir = tmp_path_factory.mktemp('work')
    options = [
        f'{k}_dataloader.dataset.data_root={root}'
        for k in ('train', 'val', 'test')
    ]
    proc = tools.run(
        [
            'tools/train.py',
            CONFIG,
            '--work-dir',
            str(work_dir),
            '--cfg-options',
            'train_cfg.max_epochs=1',
            'randomness.seed=0',
            *options,
        ]
    )
    tools.check_ok(proc)
    return work_dir


def test_train_logs_every_loss_term(trained):
    logs = sorted(trained.glob('*/vis_data/scalars.json'))
    records = [
        json.loads(line)
        for line in logs[-1].read_text().split('\n')
        if line.strip()
    ]
    train = [r for r in records if 'loss' in r]
    assert len(train) == 2  # 16 images, 8 per step, logged every step
    for record in train:
        for key in LOSS_KEYS:
            assert key in record, (key, record)
            assert record[key] == record[key]  # not NaN
        total = sum(record[k] for k in LOSS_KEYS)
        assert abs(record['loss'] - total) < 1e-3 * max(1, abs(total))
    assert any('accuracy/top1' in r for r in records)


def test_checkpoint_has_the_student_only(trained):
    ckpt = torch.load(
        osp.join(trained, 'epoch_1.pth'), map_location='cpu', weights_only=True
    )
    keys = list(ckpt['state_dict'])
    assert any('pruner.scorer.predictors.2.' in k for k in keys)
    assert any('direction_gate.fc' in k for k in keys)
    assert not any(k.startswith('teacher') for k in keys)
