"""tools/analysis_tools/visualize_detection.py: its parts and a tiny run."""

import json
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config

from mmssm.errors import UserError

TOOL = osp.join('tools', 'analysis_tools', 'visualize_detection.py')


@pytest.fixture(scope='module')
def tool(tools):
    return tools.load_script(TOOL)


def test_gt_instances(tool, tmp_path):
    """Boxes (x1, y1, x2, y2), labels among the model's classes and masks
    of an image found by file name; crowds and other classes left out."""
    square = [[2, 3, 12, 3, 12, 9, 2, 9]]  # x in 2..12, y in 3..9
    coco = dict(
        images=[dict(id=7, file_name='sub/a.png', height=20, width=30)],
        categories=[dict(id=1, name='dog'), dict(id=3, name='person')],
        annotations=[
            dict(id=1, image_id=7, category_id=3, bbox=[2, 3, 10, 6],
                 segmentation=square, area=60, iscrowd=0),
            dict(id=2, image_id=7, category_id=3, bbox=[0, 0, 4, 4],
                 segmentation=square, area=60, iscrowd=1),
            dict(id=3, image_id=7, category_id=1, bbox=[0, 0, 4, 4],
                 segmentation=square, area=60, iscrowd=0),
        ],
    )  # fmt: skip
    ann_file = tmp_path / 'ann.json'
    ann_file.write_text(json.dumps(coco))
    inst = tool.gt_instances(str(ann_file), '/x/a.png', ('cat', 'person'))
    assert inst.bboxes.tolist() == [[2, 3, 12, 9]]
    assert inst.labels.tolist() == [1]
    assert inst.masks.shape == (1, 20, 30)
    assert inst.masks[0, 4:8, 3:11].all() and not inst.masks[0, 12:].any()
    with pytest.raises(UserError, match='no image named b.png'):
        tool.gt_instances(str(ann_file), 'b.png', ('person',))


def test_kept_to_image(tool):
    """Token (i, j) covers a stride-square of the resized input, cropped to
    it and resized to the original image."""
    kept = np.array([[1, 0], [0, 1]], bool)
    full = tool.kept_to_image(kept, 4, (6, 8), (12, 16))
    assert full.shape == (12, 16)
    assert full[:8, :8].all() and not full[:8, 8:].any()
    assert not full[8:, :8].any() and full[8:, 8:].all()


def _tiny_detector(tools, configs, tmp_path, prune_cfg=None):
    """A tiny Mask R-CNN of the mini config (random weights): its config
    file and checkpoint."""
    from mmdet.apis import init_detector

    cfg = Config.fromfile(osp.join(tools.root, tools.mini_cfg))
    configs.shrink_backbone(cfg)
    if prune_cfg is not None:
        cfg.model.backbone.backbone.prune_cfg = prune_cfg
    # the heads and images of the shrunk mini config (not its backbone
    # keys: shrink_backbone did it)
    shrink = tools.shrink.items()
    cfg.merge_from_dict(
        {k: v for k, v in shrink if not k.startswith('model.backbone.')}
    )
    config = str(tmp_path / 'cfg.py')
    cfg.dump(config)
    model = init_detector(cfg, device='cpu')
    checkpoint = str(tmp_path / 'det.pth')
    torch.save(
        dict(
            state_dict=model.state_dict(),
            meta=dict(dataset_meta=dict(classes=('person',))),
        ),
        checkpoint,
    )
    return config, checkpoint


def _mini_images(tools, *names):
    folder = osp.join(tools.root, 'data', 'coco_persons_mini', 'val2017')
    return [osp.join(folder, name) for name in names]


def test_visualize_detection_tool(tool, tools, configs, tmp_path):
    """A tiny pruned Mask R-CNN (random weights) on a mini-COCO image: one
    panel per step, recorded by a step hook, and the hook removed."""
    config, checkpoint = _tiny_detector(tools, configs, tmp_path)
    (image,) = _mini_images(tools, '000000000785.jpg')
    out = tmp_path / 'vis.png'
    argv = [config, checkpoint, image, '--out', str(out)]
    summary = tool.main(argv + ['--ann-file', tools.mini_ann])
    ((layer, kept, total),) = summary['images'][0]['steps']
    assert layer == 2 and kept == total // 2 > 0
    from PIL import Image

    with Image.open(out) as png:  # ground truth, prediction, one step
        assert png.width > 2.5 * png.height
    other = tmp_path / 'other.json'
    other.write_text(
        json.dumps(dict(images=[], annotations=[], categories=[]))
    )
    with pytest.raises(SystemExit, match='^error: .*no image named'):
        tool.main(argv + ['--ann-file', str(other)])


def test_learned_pruning_on_two_images(tool, tools, configs, tmp_path):
    """DyVM's learned pruner (eval: the top int(0.5 M) of its predictor)
    drawn on two images, one row each; the figure names it."""
    learned = dict(
        type='mmssm.LearnedTokenPruner', layers=(2,), keep_ratios=0.5
    )
    config, checkpoint = _tiny_detector(tools, configs, tmp_path, learned)
    images = _mini_images(tools, '000000000785.jpg', '000000040083.jpg')
    out = tmp_path / 'vis.png'
    summary = tool.main([config, checkpoint, *images, '--out', str(out)])
    assert [s['image'] for s in summary['images']] == images
    for image in summary['images']:
        ((layer, kept, total),) = image['steps']
        assert layer == 2 and kept == int(0.5 * total) > 0
    assert 'learned (DyVM), rearranged;' in summary['pruner']
    from PIL import Image

    with Image.open(out) as png:  # 2 rows of (prediction, one step)
        assert 0.6 * png.height < png.width < 1.6 * png.height
