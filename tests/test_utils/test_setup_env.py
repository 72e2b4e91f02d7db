"""The checks that tools/train.py and tools/test.py run before the Runner."""

import os.path as osp
import socket

import pytest
import torch
from mmengine.config import Config
from torch import nn

from mmssm.utils.setup_env import (
    InputError,
    check_checkpoint,
    check_data_paths,
    check_pretrained,
    config_task,
    setup_cpu_distributed,
)

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
MINI = osp.join(ROOT, 'data', 'coco_persons_mini')


def _det_cfg(
    data_root=MINI + '/',
    ann='annotations/test_coco.json',
    img='val2017/',
    val=True,
) -> Config:
    dataset = dict(
        type='CocoDataset',
        data_root=data_root,
        ann_file=ann,
        data_prefix=dict(img=img),
    )
    cfg = dict(
        default_scope='mmdet',
        train_dataloader=dict(dataset=dataset),
        val_dataloader=dict(dataset=dict(dataset, test_mode=True)),
        val_evaluator=dict(
            type='CocoMetric', ann_file=osp.join(data_root, ann)
        ),
        val_cfg=dict(type='ValLoop') if val else None,
    )
    cfg['test_dataloader'] = cfg['val_dataloader']
    cfg['test_evaluator'] = cfg['val_evaluator']
    return Config(cfg)


def test_config_task():
    assert config_task(Config(dict(default_scope='mmdet'))) == 'mmdet'
    assert config_task(Config(dict(default_scope='mmseg'))) == 'mmseg'
    with pytest.raises(InputError, match='default_scope of the config is'):
        config_task(Config(dict(default_scope='mmpretrain')))
    with pytest.raises(InputError, match='None'):
        config_task(Config(dict()))


def test_data_paths_present():
    check_data_paths(_det_cfg(), 'train')
    check_data_paths(_det_cfg(), 'test')


def test_missing_data_root_is_named(tmp_path):
    missing = str(tmp_path / 'nowhere') + '/'
    with pytest.raises(InputError) as info:
        check_data_paths(_det_cfg(data_root=missing), 'train')
    message = str(info.value)
    assert 'train_dataloader.dataset.data_root' in message
    assert 'val_dataloader.dataset.data_root' in message
    assert missing in message
    assert 'val_evaluator.ann_file' in message


def test_missing_ann_file_and_prefix_are_named():
    with pytest.raises(InputError) as info:
        check_data_paths(
            _det_cfg(ann='annotations/x.json', img='train/'), 'test'
        )
    message = str(info.value)
    assert "test_dataloader.dataset.ann_file: file '" in message
    assert osp.join(MINI, 'annotations/x.json') in message
    assert 'test_dataloader.dataset.data_prefix.img' in message
    assert 'train_dataloader' not in message  # not read by a test run


def test_val_data_unchecked_without_validation(tmp_path):
    cfg = _det_cfg(val=False)
    cfg.val_dataloader.dataset.data_root = str(tmp_path / 'nowhere')
    check_data_paths(cfg, 'train')


def test_wrapped_datasets_are_walked(tmp_path):
    cfg = _det_cfg()
    inner = cfg.train_dataloader.dataset
    inner.data_root = str(tmp_path / 'nowhere')
    cfg.train_dataloader.dataset = dict(
        type='ConcatDataset',
        datasets=[dict(type='RepeatDataset', times=2, dataset=inner)],
    )
    with pytest.raises(
        InputError,
        match=r'train_dataloader\.dataset\.'
        r'datasets\[0\]\.dataset\.data_root',
    ):
        check_data_paths(cfg, 'train')


def test_seg_data_prefix(tmp_path):
    root = osp.join(ROOT, 'data', 'ade20k_mini')
    dataset = dict(
        type='ADE20KDataset',
        data_root=root,
        data_prefix=dict(
            img_path='images/validation', seg_map_path='annotations/validation'
        ),
    )
    cfg = Config(
        dict(default_scope='mmseg', test_dataloader=dict(dataset=dataset))
    )
    check_data_paths(cfg, 'test')
    cfg.test_dataloader.dataset.data_prefix.seg_map_path = 'annotations/x'
    with pytest.raises(InputError, match='data_prefix.seg_map_path'):
        check_data_paths(cfg, 'test')


def test_remote_data_is_not_checked():
    cfg = _det_cfg(data_root='s3://bucket/coco/')
    check_data_paths(cfg, 'train')


def test_cpu_distributed_setup():
    cfg = Config(
        dict(
            model=dict(
                backbone=dict(norm_cfg=dict(type='SyncBN')),
                neck=[dict(norm_cfg=dict(type='SyncBN'))],
            ),
            env_cfg=dict(dist_cfg=dict(backend='nccl')),
        )
    )
    assert setup_cpu_distributed(cfg, 'none') is None
    assert cfg.env_cfg.dist_cfg.backend == 'nccl'
    if torch.cuda.is_available():
        pytest.skip('the CPU setup only applies without CUDA')
    with socket.socket() as s:  # a free port
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = dict(
        MASTER_ADDR='127.0.0.1',
        MASTER_PORT=str(port),
        RANK='0',
        WORLD_SIZE='1',
        LOCAL_RANK='0',
    )
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        try:
            note = setup_cpu_distributed(cfg, 'pytorch')
            assert torch.distributed.get_backend() == 'gloo'
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    assert cfg.model_wrapper_cfg.device_ids is None
    assert cfg.model.backbone.norm_cfg.type == 'BN'
    assert cfg.model.neck[0].norm_cfg.type == 'BN'
    assert '2 SyncBN' in note


class _Net(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.fc = nn.Linear(width, 2)
        self.bn = nn.BatchNorm1d(2)


def test_check_checkpoint(tmp_path):
    model = _Net()
    good = tmp_path / 'good.pth'
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), good)
    check_checkpoint(model, str(good))
    # as mmengine's wrappers save it, and with the running-stat counter
    # missing (old checkpoints)
    state = {
        'module.' + k: v
        for k, v in model.state_dict().items()
        if 'num_batches_tracked' not in k
    }
    torch.save(state, tmp_path / 'module.pth')
    check_checkpoint(model, str(tmp_path / 'module.pth'))

    with pytest.raises(InputError, match='does not exist'):
        check_checkpoint(model, str(tmp_path / 'none.pth'))

    other = dict(model.state_dict())
    other['head.weight'] = other.pop('fc.weight')
    torch.save(dict(state_dict=other), tmp_path / 'other.pth')
    with pytest.raises(InputError) as info:
        check_checkpoint(model, str(tmp_path / 'other.pth'))
    assert 'missing keys: fc.weight' in str(info.value)
    assert 'unexpected keys: head.weight' in str(info.value)

    torch.save(
        dict(state_dict=_Net(width=8).state_dict()), tmp_path / 'wide.pth'
    )
    with pytest.raises(InputError, match='size mismatch for fc.weight'):
        check_checkpoint(model, str(tmp_path / 'wide.pth'))


def test_check_pretrained(tmp_path):
    ckpt = tmp_path / 'in1k.pth'
    cfg = Config(
        dict(
            model=dict(
                backbone=dict(
                    backbone=dict(
                        init_cfg=dict(
                            type='Pretrained',
                            checkpoint=str(ckpt),
                            prefix='backbone.',
                        )
                    )
                ),
                neck=dict(
                    init_cfg=[
                        dict(type='Xavier'),
                        dict(
                            type='Pretrained',
                            checkpoint='https://example.com/x.pth',
                        ),
                    ]
                ),
            )
        )
    )
    with pytest.raises(InputError) as info:
        check_pretrained(cfg)
    assert (
        f"model.backbone.backbone.init_cfg.checkpoint: file '{ckpt}' "
        'does not exist'
    ) in str(info.value)
    assert 'example.com' not in str(info.value)  # URLs are not checked
    ckpt.write_bytes(b'')
    check_pretrained(cfg)
    check_pretrained(Config(dict(model=dict(init_cfg=None))))
