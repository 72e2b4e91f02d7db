"""mmssm.utils.preflight: the checks that the tools run before the Runner."""

import os.path as osp

import pytest
from mmengine.config import Config

from mmssm.errors import UserError
from mmssm.utils.preflight import (
    check_data_paths,
    check_pretrained,
    config_task,
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
    assert config_task(Config(dict(default_scope='mmpretrain'))) == (
        'mmpretrain'
    )
    with pytest.raises(UserError, match='default_scope of the config is'):
        config_task(Config(dict(default_scope='mmagic')))
    with pytest.raises(UserError, match='None'):
        config_task(Config(dict()))


def test_data_paths_present():
    check_data_paths(_det_cfg(), 'train')
    check_data_paths(_det_cfg(), 'test')


def test_missing_data_root_is_named(tmp_path):
    missing = str(tmp_path / 'nowhere') + '/'
    with pytest.raises(UserError) as info:
        check_data_paths(_det_cfg(data_root=missing), 'train')
    message = str(info.value)
    assert 'train_dataloader.dataset.data_root' in message
    assert 'val_dataloader.dataset.data_root' in message
    assert missing in message
    assert 'val_evaluator.ann_file' in message


def test_missing_ann_file_and_prefix_are_named():
    with pytest.raises(UserError) as info:
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
        UserError,
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
    with pytest.raises(UserError, match='data_prefix.seg_map_path'):
        check_data_paths(cfg, 'test')


def test_unset_paths_are_not_checked():
    cfg = _det_cfg()
    cfg.test_dataloader.dataset.ann_file = ''
    cfg.test_dataloader.dataset.data_prefix = dict(img='')
    cfg.test_evaluator = dict(type='CocoMetric')
    check_data_paths(cfg, 'test')


def test_remote_data_is_not_checked():
    cfg = _det_cfg(data_root='s3://bucket/coco/')
    check_data_paths(cfg, 'train')


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
    with pytest.raises(UserError) as info:
        check_pretrained(cfg)
    assert (
        f"model.backbone.backbone.init_cfg.checkpoint: file '{ckpt}' "
        'does not exist'
    ) in str(info.value)
    assert 'example.com' not in str(info.value)  # URLs are not checked
    ckpt.write_bytes(b'')
    check_pretrained(cfg)
    check_pretrained(Config(dict(model=dict(init_cfg=None))))
