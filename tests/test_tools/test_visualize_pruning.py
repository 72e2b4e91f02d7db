"""tools/analysis_tools/visualize_pruning.py."""

import os.path as osp

import numpy as np
import pytest
import torch

from mmssm.testing import tiny_backbone_cfg

TOOL = osp.join('tools', 'analysis_tools', 'visualize_pruning.py')


@pytest.fixture(scope='module')
def tool(tools):
    return tools.load_script(TOOL)


def test_find_backbone_cfg(tool):
    pm = dict(type='mmssm.PlainMamba', arch='l1')
    assert tool.find_backbone_cfg(pm) == (pm, '')
    clf = dict(type='ImageClassifier', backbone=pm)
    assert tool.find_backbone_cfg(clf) == (pm, 'backbone.')
    det = dict(
        type='mmdet.NoSuchDetector',
        backbone=dict(type='mmssm.NoSuchAdapter', backbone=pm),
    )
    assert tool.find_backbone_cfg(det) == (pm, 'backbone.backbone.')
    with pytest.raises(ValueError, match='no mmssm backbone'):
        tool.find_backbone_cfg(dict(type='mmdet.NoSuchDetector'))


def test_visualize_pruning_tool(tool, tmp_path):
    """The kept patches of each step, recorded by a step hook, on a
    classifier's checkpoint; a dense backbone is a user error."""
    from PIL import Image

    backbone = tiny_backbone_cfg(
        'vim', prune_cfg=dict(layers=(1, 2), keep_ratios=(0.5, 0.5))
    )
    config = tmp_path / 'cfg.py'
    config.write_text(
        'default_scope = "mmpretrain"\n'
        'model = dict(type="ImageClassifier", '
        f'backbone=dict({backbone!r}, out_type="cls_token"), '
        'head=dict(type="LinearClsHead", num_classes=10, in_channels=16))\n'
    )
    from mmssm.models.classifiers import build_classifier

    clf = build_classifier(backbone, 10)
    ckpt = tmp_path / 'ckpt.pth'
    torch.save({'state_dict': clf.state_dict()}, ckpt)
    image = tmp_path / 'img.jpg'
    pixels = np.random.default_rng(0).integers(0, 255, (70, 90, 3))
    Image.fromarray(pixels.astype(np.uint8)).save(image)
    out = tmp_path / 'vis' / 'out.png'
    summary = tool.main(
        [str(image), str(config), str(ckpt), '--out', str(out)]
        + ['--shape', '64', '96']
    )
    assert summary == [(1, 12), (2, 6)]  # 4 x 6 patches
    with Image.open(out) as png:
        assert png.width > 2 * png.height
    with pytest.raises(SystemExit, match='^error: .*prune_cfg=paper'):
        tool.main(
            [str(image), str(config), '--out', str(out)]
            + ['--cfg-options', 'model.backbone.prune_cfg=None']
        )
