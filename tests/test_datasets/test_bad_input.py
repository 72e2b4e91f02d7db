"""Bad input is reported by name: bad images and labels, bad checkpoints.

Images: a corrupt, truncated or empty image (or label map) of a data set
stops the run with an error naming the file. mmcv's ``LoadImageFromFile``
(the configs' loader) already names a corrupt or truncated image;
``mmssm.LoadImageFromFile`` and ``mmssm.LoadSegAnnotations`` name the
file in every case. Checkpoints: missing and unexpected keys are named.
"""

import os
import os.path as osp
import shutil
import subprocess
import sys

import pytest
import torch
from mmcv.transforms import LoadImageFromFile as MMCVLoadImageFromFile
from mmengine.config import Config
from mmengine.registry import DefaultScope

from mmssm.datasets import (
    ImageLoadError,
    LoadImageFromFile,
    LoadSegAnnotations,
)

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
IMG = osp.join(ROOT, 'data', 'images', 'color.jpg')
LABEL = osp.join(
    ROOT, 'data', 'ade20k_mini', 'annotations', 'validation',
    'ADE_val_00000001.png',
)  # fmt: skip
DET_CFG = osp.join(
    'configs',
    'mask_rcnn',
    'mask-rcnn_plainmamba-l1-prune_adapter-fpn_1xb2-mini_coco-persons.py',
)
SEG_CFG = osp.join(
    'configs',
    'upernet',
    'upernet_plainmamba-l1-prune_adapter_1xb2-mini_ade20k-256x256.py',
)


def _bad_files(tmp_path, src):
    """name -> path of damaged copies of ``src`` (and a missing file)."""
    raw = open(src, 'rb').read()
    ext = osp.splitext(src)[1]
    contents = {
        'truncated': raw[: len(raw) // 2],
        'cut_at_end': raw[:-2],
        'garbage': b'not an image ' * 20,
        'empty': b'',
    }
    paths = {}
    for name, data in contents.items():
        path = tmp_path / f'{name}{ext}'
        path.write_bytes(data)
        paths[name] = str(path)
    paths['missing'] = str(tmp_path / f'missing{ext}')
    return paths


# ------------------------------------------------------------ the loaders
@pytest.mark.parametrize('name', ['truncated', 'cut_at_end', 'garbage'])
def test_mmcv_loader_names_corrupt_and_truncated_images(tmp_path, name):
    """What the configs' ``LoadImageFromFile`` (mmcv's) does already."""
    path = _bad_files(tmp_path, IMG)[name]
    with pytest.raises(AssertionError, match='failed to load image: ') as e:
        MMCVLoadImageFromFile()(dict(img_path=path))
    assert path in str(e.value)


@pytest.mark.parametrize('src', [IMG, LABEL], ids=['jpeg', 'png'])
def test_mmssm_loader_names_every_bad_image(tmp_path, src):
    causes = {
        'truncated': 'the file is corrupt, truncated or not an image',
        'cut_at_end': 'the file is corrupt, truncated or not an image',
        'garbage': 'the file is corrupt, truncated or not an image',
        'empty': 'the file is empty',
        'missing': 'FileNotFoundError',
    }
    for name, path in _bad_files(tmp_path, src).items():
        with pytest.raises(ImageLoadError) as e:
            LoadImageFromFile()(dict(img_path=path))
        message = str(e.value)
        assert message.startswith(f'cannot load image {path!r}: '), message
        assert causes[name] in message, message
    # a good image: exactly what mmcv's loader gives
    ours = LoadImageFromFile(to_float32=True)(dict(img_path=src))
    theirs = MMCVLoadImageFromFile(to_float32=True)(dict(img_path=src))
    assert (ours['img'] == theirs['img']).all()
    assert ours['ori_shape'] == theirs['ori_shape']


def test_mmssm_loader_skips_with_a_warning(tmp_path, monkeypatch):
    logged = []
    monkeypatch.setattr(
        'mmssm.datasets.loading.print_log',
        lambda msg, **kwargs: logged.append((msg, kwargs)),
    )
    loader = LoadImageFromFile(ignore_empty=True)
    assert 'ignore_empty=True' in repr(loader)
    paths = _bad_files(tmp_path, IMG)
    for path in paths.values():
        assert loader(dict(img_path=path)) is None
    assert len(logged) == len(paths)
    for (message, kwargs), path in zip(logged, paths.values()):
        assert message.startswith(f'cannot load image {path!r}: ')
        assert message.endswith('; skipped (ignore_empty=True)')
        assert kwargs['level'] == 30  # WARNING
    assert loader(dict(img_path=IMG))['img'].shape == (300, 400, 3)


def test_seg_label_loader_names_every_bad_label_map(tmp_path):
    pytest.importorskip('mmseg')
    loader = LoadSegAnnotations(reduce_zero_label=True)
    # (Pillow decodes a PNG cut inside its end chunk: the pixels are whole)
    causes = {
        'truncated': 'the file is truncated',
        'garbage': 'the file is empty, corrupt or not an image',
        'empty': 'the file is empty, corrupt or not an image',
        'missing': 'FileNotFoundError',
    }
    for name, path in _bad_files(tmp_path, LABEL).items():
        if name not in causes:
            continue
        results = dict(seg_map_path=path, reduce_zero_label=True)
        with pytest.raises(ImageLoadError) as e:
            loader(dict(results, seg_fields=[]))
        message = str(e.value)
        assert message.startswith(
            f'cannot load segmentation map {path!r}: '
        ), message
        assert causes[name] in message, message
    good = loader(
        dict(seg_map_path=LABEL, reduce_zero_label=True, seg_fields=[])
    )
    assert good['gt_seg_map'].shape == (512, 683)
    assert good['seg_fields'] == ['gt_seg_map']
    # no label map (mmseg's inference_model): nothing to load
    assert loader(dict(img_path=IMG)) == dict(img_path=IMG)


# --------------------------------------------------------- in a data set
def _coco_copy(tmp_path):
    """data/coco_persons_mini copied, its first image (by id) truncated."""
    root = tmp_path / 'coco'
    shutil.copytree(osp.join(ROOT, 'data', 'coco_persons_mini'), root)
    first = sorted((root / 'val2017').iterdir())[0]
    raw = first.read_bytes()
    first.write_bytes(raw[: len(raw) // 3])
    return root, str(first)


def _det_dataset(root, pipeline_head=None):
    from mmdet.registry import DATASETS

    cfg = Config.fromfile(osp.join(ROOT, DET_CFG))
    dataset = cfg.test_dataloader.dataset
    dataset.data_root = str(root) + '/'
    if pipeline_head is not None:
        dataset.pipeline[0] = pipeline_head
    # the config's scope while building, not for the tests that follow
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        return DATASETS.build(dataset)


def test_det_dataset_names_its_truncated_image(tmp_path):
    pytest.importorskip('mmdet')
    root, bad = _coco_copy(tmp_path)
    # the configs' pipelines as they are (mmcv's loader)
    dataset = _det_dataset(root)
    index = [
        dataset.get_data_info(i)['img_path'] for i in range(len(dataset))
    ].index(bad)
    with pytest.raises(AssertionError, match='failed to load image') as e:
        dataset[index]
    assert bad in str(e.value)
    # mmssm's loader, in the main process and in a DataLoader worker
    dataset = _det_dataset(root, dict(type='mmssm.LoadImageFromFile'))
    assert dataset[(index + 1) % len(dataset)]['inputs'].ndim == 3
    with pytest.raises(ImageLoadError) as e:
        dataset[index]
    image_id = dataset.get_data_info(index)['img_id']  # named too
    assert str(e.value).startswith(
        f'cannot load image {bad!r} (image id {image_id}): the file'
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, [index]),
        num_workers=1,
        collate_fn=lambda batch: batch,
    )
    with pytest.raises(ImageLoadError) as e:
        next(iter(loader))
    assert f'cannot load image {bad!r}' in str(e.value)


def test_seg_dataset_names_its_truncated_label_map(tmp_path):
    pytest.importorskip('mmseg')
    from mmseg.registry import DATASETS

    root = tmp_path / 'ade'
    shutil.copytree(osp.join(ROOT, 'data', 'ade20k_mini'), root)
    bad = root / 'annotations' / 'validation' / 'ADE_val_00000002.png'
    bad.write_bytes(bad.read_bytes()[:500])
    cfg = Config.fromfile(osp.join(ROOT, SEG_CFG))
    dataset = cfg.test_dataloader.dataset
    dataset.data_root = str(root) + '/'
    (i,) = [
        i for i, t in enumerate(dataset.pipeline)
        if t['type'] == 'LoadAnnotations'
    ]  # fmt: skip
    dataset.pipeline[i] = dict(
        dataset.pipeline[i], type='mmssm.LoadSegAnnotations'
    )
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        dataset = DATASETS.build(dataset)
    index = [
        dataset.get_data_info(i)['seg_map_path'] for i in range(len(dataset))
    ].index(str(bad))
    assert dataset[(index + 1) % len(dataset)]['inputs'].ndim == 3
    with pytest.raises(ImageLoadError) as e:
        dataset[index]
    assert str(e.value) == (
        f'cannot load segmentation map {str(bad)!r}: the file is truncated'
    )


def test_train_run_stops_at_a_truncated_image_naming_it(tmp_path):
    """tools/train.py: the run fails at the bad image, and says which."""
    pytest.importorskip('mmdet')
    root, bad = _coco_copy(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS='2')
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (ROOT, os.environ.get('PYTHONPATH')) if p
    )
    result = subprocess.run(
        [
            sys.executable,
            'tools/train.py',
            DET_CFG,
            '--work-dir',
            str(tmp_path / 'work'),
            '--cfg-options',
            f'train_dataloader.dataset.data_root={root}/',
            'train_dataloader.sampler.shuffle=False',  # the bad image first
            f'val_dataloader.dataset.data_root={root}/',
            f'test_dataloader.dataset.data_root={root}/',
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0, result.stdout[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == f'AssertionError: failed to load image: {bad}', (
        result.stderr[-3000:]
    )
    assert 'Epoch(train)' not in result.stdout + result.stderr


# ------------------------------------------------------------ checkpoints
def _tiny_backbone(init_cfg=None):
    from mmssm.models.backbones import PlainMamba

    arch = dict(
        embed_dims=32,
        num_layers=2,
        num_convs=1,
        dw_layers=[],
        d_state=4,
        expand=1,
        conv_size=3,
    )
    return PlainMamba(arch=arch, init_cfg=init_cfg)


def _bad_checkpoint(tmp_path, prefix=''):
    state_dict = {
        prefix + k: v for k, v in _tiny_backbone().state_dict().items()
    }
    missing = prefix + 'layers.1.mamba.A_log'
    del state_dict[missing]
    state_dict[prefix + 'layers.2.mamba.A_log'] = torch.zeros(4)
    path = tmp_path / 'bad.pth'
    torch.save(dict(state_dict=state_dict, meta={}), path)
    return str(path), 'layers.1.mamba.A_log', 'layers.2.mamba.A_log'


def test_pretrained_init_names_missing_and_unexpected_keys(
    tmp_path, monkeypatch
):
    """init_cfg Pretrained (and mmdet/mmseg's init_*): mmengine's warning."""
    logged = []
    monkeypatch.setattr(
        'mmengine.runner.checkpoint.print_log',
        lambda msg, **kwargs: logged.append(str(msg)),
    )
    path, missing, unexpected = _bad_checkpoint(tmp_path, 'backbone.')
    model = _tiny_backbone(
        dict(type='Pretrained', checkpoint=path, prefix='backbone.')
    )
    model.init_weights()
    text = '\n'.join(logged)
    assert f'unexpected key in source state_dict: {unexpected}' in text
    assert f'missing keys in source state_dict: {missing}' in text


def test_strict_load_names_missing_and_unexpected_keys(tmp_path):
    """tools/test.py and demo/image_demo.py: refused, keys named."""
    from mmssm.errors import UserError
    from mmssm.utils.checkpoint import load_checkpoint_strict

    path, missing, unexpected = _bad_checkpoint(tmp_path)
    with pytest.raises(UserError) as e:
        load_checkpoint_strict(_tiny_backbone(), path)
    message = str(e.value)
    assert f'missing keys: {missing}' in message
    assert f'unexpected keys: {unexpected}' in message
