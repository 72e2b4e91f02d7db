"""IgnoreOutOfRangeLabels: label values that are not classes are ignored.

mmseg ignores its ``ignore_index`` (255) in the loss and in ``IoUMetric``
but nothing else: a label value >= ``num_classes`` makes the loss raise and
is counted against the predicted class by the metric. The segmentation
configs put ``mmssm.IgnoreOutOfRangeLabels`` after ``LoadAnnotations``;
here it is checked alone and in the mini ADE20K config's pipelines, metric
and loss, on copies of the mini set's label maps with blocks of values that
are no ADE20K class.
"""

import os.path as osp
import shutil

import numpy as np
import pytest
import torch
from mmengine.config import Config
from PIL import Image

from mmssm.datasets.transforms import IgnoreOutOfRangeLabels
from mmssm.registry import TRANSFORMS

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SEG_CFG = osp.join(
    ROOT,
    'configs',
    'upernet',
    'upernet_plainmamba-l1-prune_adapter_1xb2-mini_ade20k-256x256.py',
)
MINI = osp.join(ROOT, 'data', 'ade20k_mini')
IMAGES = ('ADE_val_00000001', 'ADE_val_00000002', 'ADE_val_00000003')
NUM_CLASSES = 150


def test_out_of_range_values_become_ignore_index():
    seg = np.array([[0, 5, 149, 150], [199, 255, 254, 7]], np.uint8)
    results = IgnoreOutOfRangeLabels(NUM_CLASSES)(
        dict(gt_seg_map=seg.copy(), seg_fields=['gt_seg_map'])
    )
    np.testing.assert_array_equal(
        results['gt_seg_map'], [[0, 5, 149, 255], [255, 255, 255, 7]]
    )
    assert results['gt_seg_map'].dtype == np.uint8


def test_negative_values_and_other_ignore_index():
    seg = np.array([[-1, 0, 3, 4, -100]], np.int64)
    transform = IgnoreOutOfRangeLabels(4, ignore_index=-100)
    results = transform(dict(gt_seg_map=seg, seg_fields=['gt_seg_map']))
    np.testing.assert_array_equal(
        results['gt_seg_map'], [[-100, 0, 3, -100, -100]]
    )
    np.testing.assert_array_equal(seg, [[-1, 0, 3, 4, -100]])  # a copy


def test_valid_maps_are_left_alone():
    seg = np.array([[0, 1], [255, 2]], np.uint8)
    results = IgnoreOutOfRangeLabels(3)(
        dict(gt_seg_map=seg, seg_fields=['gt_seg_map'])
    )
    assert results['gt_seg_map'] is seg  # no copy when nothing changes
    # only the maps of seg_fields (or of the seg_fields argument)
    other = np.array([[9]], np.uint8)
    results = IgnoreOutOfRangeLabels(3)(dict(other=other, seg_fields=[]))
    assert results['other'] is other
    results = IgnoreOutOfRangeLabels(3, seg_fields=['other'])(
        dict(other=other)
    )
    assert results['other'].tolist() == [[255]]


def test_arguments_and_registry():
    with pytest.raises(ValueError, match='num_classes'):
        IgnoreOutOfRangeLabels(0)
    with pytest.raises(ValueError, match='is a class index'):
        IgnoreOutOfRangeLabels(150, ignore_index=3)
    transform = TRANSFORMS.build(
        dict(type='IgnoreOutOfRangeLabels', num_classes=150)
    )
    assert repr(transform) == (
        'IgnoreOutOfRangeLabels(num_classes=150, ignore_index=255, '
        'seg_fields=None)'
    )


# --------------------------------------------------------------------------
# In the segmentation configs (mmseg)
# --------------------------------------------------------------------------
# Raw values written into the copies of the label maps: 151 and 200 are no
# ADE20K class (after reduce_zero_label: 150 and 199 >= num_classes); 255
# is mmseg's own (reduce_zero_label keeps it 255).
BAD_VALUES = (151, 200, 255)
# the heads of the mini config for the shrunk backbone (tests/conftest.py)
HEADS_SHRINK = {
    'model.decode_head.in_channels': [64] * 4,
    'model.decode_head.channels': 32,
    'model.auxiliary_head.in_channels': 64,
    'model.auxiliary_head.channels': 16,
}


def _raw_label(name: str) -> np.ndarray:
    path = osp.join(MINI, 'annotations', 'validation', f'{name}.png')
    return np.array(Image.open(path))


@pytest.fixture
def bad_labels(tmp_path):
    """A copy of the mini set with blocks of BAD_VALUES in each label map."""
    root = tmp_path / 'ade20k_bad'
    shutil.copytree(MINI, root)
    masks = {}
    for name in IMAGES:
        label = _raw_label(name)
        bad = np.zeros(label.shape, bool)
        h, w = label.shape
        for i, value in enumerate(BAD_VALUES):
            block = (slice(i * h // 4, (i + 1) * h // 4), slice(0, w // 3))
            label[block] = value
            bad[block] = True
        path = root / 'annotations' / 'validation' / f'{name}.png'
        Image.fromarray(label).save(path)
        masks[name] = bad
    return str(root) + '/', masks


@pytest.fixture
def mmseg_scope(seg_scope):
    import mmssm.engine  # noqa: F401
    import mmssm.models  # noqa: F401


def _seg_cfg(data_root: str, configs, with_transform: bool = True) -> Config:
    """The mini seg config, CPU-sized, on ``data_root``, optionally without
    the transform. Its training images are resized to a short side of 128
    without random scale or crop (so the blocks stay) and read in order."""
    cfg = Config.fromfile(SEG_CFG)
    configs.shrink_backbone(cfg)
    cfg.merge_from_dict(HEADS_SHRINK)
    for part in ('train', 'val', 'test'):
        dataset = cfg[f'{part}_dataloader'].dataset
        dataset.data_root = data_root
        pipeline = []
        for t in dataset.pipeline:
            kind = t['type']
            if kind == 'RandomResize':
                t = dict(type='Resize', scale=(512, 128), keep_ratio=True)
            if kind == 'RandomCrop' or (
                kind == 'mmssm.IgnoreOutOfRangeLabels' and not with_transform
            ):
                continue
            pipeline.append(t)
        dataset.pipeline = pipeline
    cfg.train_dataloader.sampler = dict(type='DefaultSampler', shuffle=False)
    cfg.model.data_preprocessor.update(size=None, size_divisor=32)
    return cfg


def test_configs_pipelines_ignore_them(bad_labels, mmseg_scope):
    from mmseg.registry import DATASETS

    data_root, masks = bad_labels
    cfg = Config.fromfile(SEG_CFG)
    for part in ('train', 'test'):
        dataset = cfg[f'{part}_dataloader'].dataset
        types = [t.type for t in dataset.pipeline]
        i = types.index('LoadAnnotations')
        assert types[i + 1] == 'mmssm.IgnoreOutOfRangeLabels'
        assert dataset.pipeline[i + 1].num_classes == NUM_CLASSES
        dataset.data_root = data_root
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    for i in range(len(dataset)):
        sample = dataset[i]['data_samples']
        name = osp.splitext(osp.basename(sample.img_path))[0]
        gt = sample.gt_sem_seg.data[0].numpy()
        bad = masks[name]
        assert (gt[bad] == 255).all()
        # elsewhere only reduce_zero_label: 0 -> 255, k -> k - 1
        raw = _raw_label(name).astype(int)
        expected = np.where(raw == 0, 255, raw - 1)
        np.testing.assert_array_equal(gt[~bad], expected[~bad])
    # the train pipeline (random resize, crop, flip) too
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    for i in range(len(dataset)):
        values = dataset[i]['data_samples'].gt_sem_seg.data.unique()
        assert all(v < NUM_CLASSES or v == 255 for v in values.tolist())


def _evaluate_ground_truth(cfg: Config, fill: int) -> dict:
    """The test loop (dataloader, data preprocessor, IoUMetric) with the
    ground truth as prediction, ``fill`` where the label is no class."""
    from mmengine.evaluator import Evaluator
    from mmengine.runner import Runner
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS

    loader = Runner.build_dataloader(cfg.test_dataloader)
    preprocessor = MODELS.build(cfg.model.data_preprocessor)
    evaluator = Evaluator(cfg.test_evaluator)
    evaluator.dataset_meta = loader.dataset.metainfo
    for data_batch in loader:
        samples = preprocessor(data_batch, False)['data_samples']
        for sample in samples:
            label = sample.gt_sem_seg.data.clone()
            label[label >= NUM_CLASSES] = fill
            sample.pred_sem_seg = PixelData(data=label)
        evaluator.process(data_samples=samples, data_batch=data_batch)
    return evaluator.evaluate(len(loader.dataset))


def test_metric_ignores_them(bad_labels, mmseg_scope, configs):
    """Predictions at those pixels do not count, as at mmseg's 255."""
    data_root, _ = bad_labels
    # class 0 (wall) is in every image: predicting it where the label is no
    # class is a false positive unless the pixel is ignored
    metrics = _evaluate_ground_truth(_seg_cfg(data_root, configs), fill=0)
    assert metrics == dict(aAcc=100.0, mIoU=100.0, mAcc=100.0)
    # without the transform IoUMetric counts them against class 0
    metrics = _evaluate_ground_truth(
        _seg_cfg(data_root, configs, False), fill=0
    )
    assert metrics['mIoU'] < 100


def test_loss_ignores_them(bad_labels, mmseg_scope, configs):
    """A finite loss and gradients; without the transform it raises."""
    from mmengine.runner import Runner
    from mmseg.registry import MODELS

    data_root, _ = bad_labels
    cfg = _seg_cfg(data_root, configs)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    data = next(iter(Runner.build_dataloader(cfg.train_dataloader)))
    data = model.data_preprocessor(data, True)
    for sample in data['data_samples']:
        values = sample.gt_sem_seg.data.unique().tolist()
        assert 255 in values and max(v for v in values if v != 255) < 150
    losses = model(**data, mode='loss')
    total = losses['decode.loss_ce'] + losses['aux.loss_ce']
    assert torch.isfinite(total)
    total.backward()
    assert model.decode_head.conv_seg.weight.grad.abs().sum() > 0

    cfg = _seg_cfg(data_root, configs, with_transform=False)
    data = next(iter(Runner.build_dataloader(cfg.train_dataloader)))
    data = model.data_preprocessor(data, True)
    assert 199 in data['data_samples'][0].gt_sem_seg.data
    with pytest.raises(IndexError, match='out of bounds'):
        model(**data, mode='loss')
