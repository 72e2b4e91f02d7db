"""tools/test.py on the mini COCO set, and the evaluation path itself."""

import mmengine
import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from mmengine.config import Config
from mmengine.evaluator import Evaluator
from mmengine.registry import DefaultScope
from pycocotools.coco import COCO

BB = 'model.backbone.backbone'
AP_LINE = 'Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all'


def test_test_py_evaluates_with_coco_metric(trained, tools, tmp_path):
    work_dir, _ = trained
    out = tmp_path / 'results.pkl'
    result = tools.run(
        [
            'tools/test.py',
            tools.mini_cfg,
            str(work_dir / 'epoch_1.pth'),
            '--work-dir',
            str(tmp_path / 'test'),
            '--out',
            str(out),
            '--show-dir',
            'vis',
            *tools.cfg_options(tools.shrink),
        ]
    )
    tools.check_ok(result)
    log = result.stdout + result.stderr
    assert 'Epoch(test) [4/4]' in log
    # pycocotools' summaries of both the boxes and the masks
    assert 'Evaluate annotation type *bbox*' in log
    assert 'Evaluate annotation type *segm*' in log
    assert log.count(AP_LINE) == 2
    summary = [
        line[line.index('coco/bbox_mAP:') :]
        for line in log.splitlines()
        if 'coco/bbox_mAP:' in line
    ]
    assert summary and 'coco/segm_mAP:' in summary[-1]
    print('\ntools/test.py on the mini set:', summary[-1])  # shown with -s
    # --show-dir: inside <work dir>/<timestamp>/, as mmdet's test.py
    drawn = list((tmp_path / 'test').glob('*/vis/*.jpg'))
    assert len(drawn) == 4
    results = mmengine.load(out)  # a pickle written by DumpDetResults
    assert len(results) == 4
    assert {'bboxes', 'masks'} <= set(results[0]['pred_instances'])


def _ground_truth_predictions(coco: COCO, drop_every: int = 0):
    """Each annotation as a prediction: score 1, mask from its polygons."""
    samples = []
    for img_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(img_id)[0]
        h, w = info['height'], info['width']
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        if drop_every:
            anns = anns[::drop_every]
        boxes = [
            [x, y, x + bw, y + bh]
            for x, y, bw, bh in (a['bbox'] for a in anns)
        ]
        masks = [
            mask_utils.decode(
                mask_utils.merge(
                    mask_utils.frPyObjects(a['segmentation'], h, w)
                )
            )
            for a in anns
        ]
        samples.append(
            dict(
                img_id=img_id,
                ori_shape=(h, w),
                pred_instances=dict(
                    bboxes=torch.tensor(boxes, dtype=torch.float32),
                    scores=torch.ones(len(anns)),
                    labels=torch.zeros(len(anns), dtype=torch.long),
                    masks=torch.from_numpy(np.stack(masks).astype(bool)),
                ),
            )
        )
    return samples


def _evaluate(cfg: Config, samples) -> dict:
    from mmdet.registry import DATASETS

    evaluator = Evaluator(cfg.val_evaluator)
    dataset = DATASETS.build(dict(cfg.val_dataloader.dataset, pipeline=[]))
    evaluator.dataset_meta = dataset.metainfo
    for sample in samples:
        evaluator.process([sample])
    return evaluator.evaluate(len(samples))


def test_ground_truth_as_predictions_scores_ap_1(tools, monkeypatch):
    """The mini config's evaluation path, fed the ground truth."""
    monkeypatch.chdir(tools.root)  # the config's paths are relative
    cfg = Config.fromfile(tools.mini_cfg)
    coco = COCO(cfg.val_evaluator.ann_file)
    assert len(coco.getImgIds()) == 4 and len(coco.getAnnIds()) == 14
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        metrics = _evaluate(cfg, _ground_truth_predictions(coco))
        # and the path is not 1 for anything: half the objects missed
        halved = _evaluate(cfg, _ground_truth_predictions(coco, drop_every=2))
    for kind in ('bbox', 'segm'):
        for key in ('mAP', 'mAP_50', 'mAP_75'):
            assert metrics[f'coco/{kind}_{key}'] == pytest.approx(1.0)
    assert halved['coco/bbox_mAP'] < 0.8 and halved['coco/segm_mAP'] < 0.8


def test_test_py_refuses_a_checkpoint_of_another_backbone(
    trained, tools, tmp_path
):
    work_dir, _ = trained
    ckpt = str(work_dir / 'epoch_1.pth')  # a PlainMamba detector
    shrink = {k: v for k, v in tools.shrink.items() if not k.startswith(BB)}
    vim = {
        f'{BB}._delete_': True,
        f'{BB}.type': 'mmssm.Vim',
        f'{BB}.arch.embed_dims': 64,
        f'{BB}.arch.num_layers': 4,
        f'{BB}.arch.patch_size': 16,
        f'{BB}.arch.stride': 16,
        f'{BB}.arch.d_state': 8,
        f'{BB}.arch.expand': 1,
        f'{BB}.arch.d_conv': 4,
        f'{BB}.arch.cls_token': None,
        f'{BB}.cls_token': None,
        f'{BB}.final_norm': False,
    }
    # the same backbone with another SSM state size
    other_state = {**tools.shrink, f'{BB}.arch.d_state': 16}
    for options, expected in (
        (
            {**shrink, **vim},
            [
                'missing keys: backbone.backbone.',
                'unexpected keys: backbone.backbone.',
                'another backbone',
            ],
        ),
        (other_state, ['size mismatch for backbone.backbone.layers.0.']),
    ):
        result = tools.run(
            [
                'tools/test.py',
                tools.mini_cfg,
                ckpt,
                '--work-dir',
                str(tmp_path),
                *tools.cfg_options(options),
            ]
        )
        assert result.returncode != 0
        assert f"error: checkpoint '{ckpt}'" in result.stderr
        for text in expected:
            assert text in result.stderr, result.stderr[-3000:]
        assert 'Epoch(test)' not in result.stdout + result.stderr
