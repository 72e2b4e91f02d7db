"""tools/train.py and tools/test.py on the mini ADE20K set (mmseg configs).

The segmentation mini config (``configs/upernet/*mini_ade20k*``, 3 ADE20K
validation images with their official label maps) runs through the same
tools as the detection configs. Also here: the ground truth as prediction
scores an mIoU of 100 through ``tools/test.py``.
"""

import os.path as osp

import numpy as np
import pytest
import torch
from PIL import Image

import mmssm  # noqa: F401  (allow-lists mmengine checkpoint types)

ORACLE_DIR = osp.dirname(osp.abspath(__file__))
IMAGES = ('ADE_val_00000001', 'ADE_val_00000002', 'ADE_val_00000003')


def _metrics(log: str, mode: str) -> dict:
    """The last ``Iter(<mode>)`` summary line's aAcc, mIoU and mAcc."""
    lines = [
        line
        for line in log.splitlines()
        if f'Iter({mode})' in line and 'mIoU:' in line
    ]
    assert lines, f'no Iter({mode}) metrics in the log'
    words = lines[-1].split()
    return {
        key: float(words[words.index(f'{key}:') + 1])
        for key in ('aAcc', 'mIoU', 'mAcc')
    }


@pytest.fixture(scope='module')
def seg_trained(tmp_path_factory, tools):
    """tools/train.py on the mini seg config: 2 iterations, then val."""
    work_dir = tmp_path_factory.mktemp('seg_train')
    result = tools.run(
        [
            'tools/train.py',
            tools.seg_cfg,
            '--work-dir',
            str(work_dir),
            *tools.cfg_options(tools.seg_2_iters),
        ]
    )
    tools.check_ok(result)
    return work_dir, result


def test_train_py_trains_validates_and_saves(seg_trained, tools):
    work_dir, result = seg_trained
    log = result.stdout + result.stderr
    assert 'Iter(train) [2/2]' in log
    assert 'decode.loss_ce' in log and 'aux.loss_ce' in log
    assert 'no CUDA' not in log  # one process: no distributed set-up
    # validation at the end: IoUMetric over the 3 images
    assert 'Iter(val) [3/3]' in log
    metrics = _metrics(log, 'val')
    assert 0 <= metrics['mIoU'] <= 100
    ckpt = work_dir / 'iter_2.pth'
    assert (work_dir / 'last_checkpoint').read_text().strip() == str(ckpt)
    checkpoint = torch.load(ckpt, map_location='cpu', weights_only=True)
    assert checkpoint['meta']['iter'] == 2
    # the pruning schedule the run used (mmssm.PruningMetaHook)
    pruning = checkpoint['meta']['pruning']['backbone.backbone']
    assert (pruning['type'], pruning['layers']) == ('PlainMamba', [2])
    assert pruning['keep_ratios'] == [0.5] and pruning['align'] is True
    assert 'token pruning: backbone.backbone: PlainMamba pruned' in log
    keys = checkpoint['state_dict'].keys()
    for prefix in (
        'backbone.backbone.layers.3.mamba.',
        'backbone.spm.',
        'decode_head.fpn_bottleneck.',
        'auxiliary_head.conv_seg.',
    ):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert (work_dir / osp.basename(tools.seg_cfg)).is_file()


def test_test_py_evaluates_with_iou_metric(seg_trained, tools, tmp_path):
    work_dir, _ = seg_trained
    out = tmp_path / 'pred'
    result = tools.run(
        [
            'tools/test.py',
            tools.seg_cfg,
            str(work_dir / 'iter_2.pth'),
            '--work-dir',
            str(tmp_path / 'test'),
            '--out',
            str(out),
            '--show-dir',
            str(tmp_path / 'vis'),
            # mmseg's hook draws every 50th image unless told otherwise
            *tools.cfg_options(
                {**tools.seg_shrink, 'default_hooks.visualization.interval': 1}
            ),
        ]
    )
    tools.check_ok(result)
    log = result.stdout + result.stderr
    assert 'Iter(test) [3/3]' in log
    assert 'per class results:' in log  # IoUMetric's table
    metrics = _metrics(log, 'test')
    assert 0 <= metrics['mIoU'] <= 100
    summary = [line for line in log.splitlines() if 'Iter(test) [3/3]' in line]
    print('\ntools/test.py on the mini ADE20K set:', summary[-1])
    # --out: the predicted label maps, in the label files' encoding
    for name in IMAGES:
        pred = np.array(Image.open(out / f'{name}.png'))
        label = np.array(Image.open(_label_path(tools.root, name)))
        assert pred.shape == label.shape  # at the original image size
    # --show-dir: the images with the predictions drawn
    assert len(list((tmp_path / 'vis').rglob('*.png'))) == 3


def _label_path(root: str, name: str) -> str:
    return osp.join(
        root, 'data', 'ade20k_mini', 'annotations', 'validation', f'{name}.png'
    )


def _oracle_config(tmp_path, tools, fill=None) -> str:
    """A config: the mini config with the ground-truth segmentor."""
    from mmengine.config import Config

    base = osp.join(tools.root, tools.seg_cfg)
    preprocessor = Config.fromfile(base).model.data_preprocessor.to_dict()
    path = tmp_path / 'oracle.py'
    path.write_text(
        f'_base_ = {base!r}\n'
        "custom_imports = dict(imports=['mmssm.models', 'mmssm.engine', "
        "'mmssm.datasets.transforms', 'seg_oracle'], "
        'allow_failed_imports=False)\n'
        "model = dict(_delete_=True, type='GroundTruthSegmentor', "
        f'data_preprocessor={preprocessor!r}, fill={fill!r})\n'
    )
    return str(path)


def test_ground_truth_through_test_py_scores_miou_100(tools, tmp_path):
    """GT as prediction: tools/test.py, IoUMetric, --out, as a model."""
    ckpt = tmp_path / 'oracle.pth'
    torch.save({'state_dict': {}}, ckpt)  # the oracle has no weights
    out = tmp_path / 'pred'
    result = tools.run(
        [
            'tools/test.py',
            _oracle_config(tmp_path, tools),
            str(ckpt),
            '--work-dir',
            str(tmp_path / 'test'),
            '--out',
            str(out),
        ],
        env=dict(PYTHONPATH=ORACLE_DIR),
    )
    tools.check_ok(result)
    log = result.stdout + result.stderr
    assert 'Iter(test) [3/3]' in log
    assert _metrics(log, 'test') == dict(aAcc=100.0, mIoU=100.0, mAcc=100.0)
    # and --out writes the official label maps back, value for value
    # (classes 0..149 -> 1..150, the ignored 255 -> 0)
    for name in IMAGES:
        pred = np.array(Image.open(out / f'{name}.png'))
        label = np.array(Image.open(_label_path(tools.root, name)))
        np.testing.assert_array_equal(pred, label)
