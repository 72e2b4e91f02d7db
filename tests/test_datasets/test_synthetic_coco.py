"""The synthetic COCO set of shapes and the main job's config."""

import hashlib
import importlib.util
import json
import os
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config

from mmssm.datasets import synthetic_coco
from mmssm.datasets.synthetic_coco import CLASSES, make_synthetic_coco

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = osp.join(
    ROOT,
    'configs',
    'mask_rcnn',
    'mask-rcnn_plainmamba-l1-prune_adapter-fpn_1xb4-synthetic_coco-shapes.py',
)
SMALL = dict(num_train=4, num_val=3, image_size=64, seed=3)


def _digests(folder):
    """{relative path: sha256} of every file under a folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = osp.join(root, name)
            with open(path, 'rb') as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            out[osp.relpath(path, folder)] = digest
    return out


@pytest.fixture(scope='module')
def small_set(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('syn') / 'shapes')
    assert make_synthetic_coco(out, **SMALL) is True
    return out


def test_same_seed_same_bytes(small_set, tmp_path):
    again = str(tmp_path / 'again')
    make_synthetic_coco(again, **SMALL)
    first = _digests(small_set)
    assert first == _digests(again)
    assert len([p for p in first if p.endswith('.png')]) == 7
    other = str(tmp_path / 'other')
    make_synthetic_coco(other, **dict(SMALL, seed=4))
    assert _digests(other) != first
    # the validation images do not depend on the number of training images
    more = str(tmp_path / 'more')
    make_synthetic_coco(more, **dict(SMALL, num_train=5))
    digests = _digests(more)
    for path in ('annotations/instances_val.json', 'val/000002.png'):
        assert digests[path] == first[path]


def test_valid_coco_and_masks_match_boxes(small_set):
    from pycocotools.coco import COCO

    for split, num in (('train', 4), ('val', 3)):
        ann_file = osp.join(
            small_set, 'annotations', f'instances_{split}.json'
        )
        coco = COCO(ann_file)
        assert sorted(c['name'] for c in coco.loadCats(coco.getCatIds())) == (
            sorted(CLASSES)
        )
        assert len(coco.getImgIds()) == num
        assert len(coco.getAnnIds()) >= num  # at least one shape per image
        for img in coco.loadImgs(coco.getImgIds()):
            assert (img['height'], img['width']) == (64, 64)
            path = osp.join(small_set, split, img['file_name'])
            assert osp.isfile(path)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=img['id'])):
                assert ann['iscrowd'] == 0
                mask = coco.annToMask(ann)
                ys, xs = np.nonzero(mask)
                x, y, w, h = ann['bbox']
                # the box is the polygon's bounds; the mask fills it
                assert abs(xs.min() - x) <= 1 and abs(ys.min() - y) <= 1
                assert abs(xs.max() + 1 - (x + w)) <= 1
                assert abs(ys.max() + 1 - (y + h)) <= 1
                assert ann['area'] == pytest.approx(int(mask.sum()), rel=0.1)


def test_image_shows_the_shapes(small_set):
    """Each shape's pixels differ from the background around it."""
    import cv2
    from pycocotools.coco import COCO

    coco = COCO(osp.join(small_set, 'annotations', 'instances_train.json'))
    for img in coco.loadImgs(coco.getImgIds()):
        image = cv2.imread(osp.join(small_set, 'train', img['file_name']))
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img['id'])):
            mask = coco.annToMask(ann).astype(bool)
            inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3))) > 0
            ring = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7))) > 0
            ring &= ~mask
            diff = image[inner].mean(0) - image[ring].mean(0)
            assert np.linalg.norm(diff) > 20


def test_existing_set(small_set):
    mtime = os.stat(osp.join(small_set, 'meta.json')).st_mtime_ns
    assert make_synthetic_coco(small_set, **SMALL) is False  # kept
    assert os.stat(osp.join(small_set, 'meta.json')).st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match='overwrite'):
        make_synthetic_coco(small_set, **dict(SMALL, seed=9))


def test_overwrite(tmp_path):
    out = str(tmp_path / 'set')
    make_synthetic_coco(out, **SMALL)
    assert make_synthetic_coco(out, **dict(SMALL, seed=9), overwrite=True)
    assert synthetic_coco.read_meta(out)['seed'] == 9
    assert os.listdir(tmp_path) == ['set']  # the old set is gone


def test_failure_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    write = synthetic_coco._write_image

    def failing(path, image):
        calls.append(path)
        if len(calls) == 3:
            raise OSError('disk full')
        write(path, image)

    monkeypatch.setattr(synthetic_coco, '_write_image', failing)
    out = str(tmp_path / 'set')
    with pytest.raises(OSError, match='disk full'):
        make_synthetic_coco(out, **SMALL)
    assert os.listdir(tmp_path) == []  # no set, no partial folder
    # and a failed overwrite keeps the old set
    monkeypatch.setattr(synthetic_coco, '_write_image', write)
    make_synthetic_coco(out, **SMALL)
    before = _digests(out)
    calls.clear()
    monkeypatch.setattr(synthetic_coco, '_write_image', failing)
    with pytest.raises(OSError, match='disk full'):
        make_synthetic_coco(out, **dict(SMALL, seed=9), overwrite=True)
    assert os.listdir(tmp_path) == ['set']
    assert _digests(out) == before


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match='image_size'):
        make_synthetic_coco(str(tmp_path / 'a'), image_size=8)
    with pytest.raises(ValueError, match='num_train'):
        make_synthetic_coco(str(tmp_path / 'a'), num_train=0)
    assert os.listdir(tmp_path) == []


def test_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        'make_synthetic_coco_cli',
        osp.join(ROOT, 'tools', 'misc', 'make_synthetic_coco.py'),
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = str(tmp_path / 'set')
    argv = [out, '--num-train', '2', '--num-val', '1', '--size', '48', '40']
    cli.main(argv)
    assert 'wrote' in capsys.readouterr().out
    cli.main(argv)
    assert 'kept' in capsys.readouterr().out
    meta = synthetic_coco.read_meta(out)
    assert meta['image_size'] == [48, 40] and meta['num_train'] == 2
    with pytest.raises(SystemExit, match='overwrite'):
        cli.main(argv[:1] + ['--seed', '5'])


# --------------------------------------------------------------------------
# The main job's config
# --------------------------------------------------------------------------
def test_config_settings():
    cfg = Config.fromfile(CONFIG)
    assert cfg.default_scope == 'mmdet'
    assert cfg.data_root.startswith('data/synthetic/')
    assert tuple(cfg.metainfo['classes']) == CLASSES
    backbone = cfg.model.backbone.backbone
    assert cfg.model.backbone.type == 'mmssm.ViTAdapter'
    assert backbone.type == 'mmssm.PlainMamba' and backbone.arch == 'l1'
    assert backbone.prune_cfg == 'paper'
    assert backbone.init_cfg is None  # no checkpoint offline
    for norm in (backbone.norm_cfg, cfg.model.backbone.norm_cfg):
        assert norm['type'] == 'BN'
    assert cfg.model.roi_head.bbox_head.num_classes == 3
    assert cfg.model.roi_head.mask_head.num_classes == 3
    assert cfg.train_cfg.type == 'IterBasedTrainLoop'
    assert cfg.train_cfg.val_interval == cfg.train_cfg.max_iters
    assert cfg.val_evaluator.type == 'CocoMetric'
    assert set(cfg.val_evaluator.metric) == {'bbox', 'segm'}
    assert cfg.val_evaluator.ann_file.startswith(cfg.data_root)
    assert cfg.default_hooks.checkpoint.by_epoch is False
    # the data of tools/main_job.sh
    with open(osp.join(ROOT, 'tools', 'main_job.sh')) as f:
        script = f.read()
    assert f'DATA={cfg.data_root.rstrip("/")}\n' in script
    assert osp.relpath(CONFIG, ROOT) in script


def test_config_builds_and_trains_on_the_set(small_set, configs, det_scope):
    """The config's pipelines read the generator's output; loss + predict."""
    from mmdet.registry import DATASETS, MODELS
    from mmengine.dataset import pseudo_collate

    import mmssm.engine  # noqa: F401
    import mmssm.models  # noqa: F401

    cfg = configs.shrink_detector(Config.fromfile(CONFIG))
    datasets = {}
    for split, loader in (
        ('train', cfg.train_dataloader),
        ('val', cfg.val_dataloader),
    ):
        ds_cfg = loader.dataset.copy()
        ds_cfg.data_root = small_set
        datasets[split] = DATASETS.build(ds_cfg)
    assert len(datasets['train']) == 4 and len(datasets['val']) == 3
    assert datasets['train'].metainfo['classes'] == CLASSES
    model = MODELS.build(cfg.model)
    model.init_weights()
    assert model.backbone.backbone.pruner is not None
    batch = pseudo_collate([datasets['train'][i] for i in range(2)])
    data = model.data_preprocessor(batch, True)
    model.train()
    losses = model(**data, mode='loss')
    total = sum(
        sum(v) if isinstance(v, list) else v
        for k, v in losses.items()
        if 'loss' in k
    )
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    data = model.data_preprocessor(pseudo_collate([datasets['val'][0]]))
    with torch.no_grad():
        (result,) = model(**data, mode='predict')
    assert result.pred_instances.masks.shape[1:] == (64, 64)


def test_meta_file(small_set):
    with open(osp.join(small_set, 'meta.json')) as f:
        meta = json.load(f)
    assert meta['seed'] == 3 and meta['image_size'] == [64, 64]
    assert meta['classes'] == list(CLASSES)
