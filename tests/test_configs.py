"""Configs load with mmengine, build from the registry and run.

So far: the ImageNet-1K classification configs (model only) of
configs/plainmamba and configs/vim, and their FLOPs/params against the
paper's Table 1.
"""

import ast
import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config

from mmssm.registry import MODELS
from mmssm.utils import count_flops

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CLS_CONFIGS = sorted(
    glob.glob(osp.join(ROOT, 'configs', 'plainmamba', '*_in1k.py'))
    + glob.glob(osp.join(ROOT, 'configs', 'vim', '*_in1k.py'))
)

# Table 1 of the paper at 224x224 (FLOPs in G, multiply-accumulates, each
# family's scan convention) and the parameters they are checked against (M):
# Vim's count the whole classifier (7 / 26 M); PlainMamba's are its
# release's 7.3 / 25.7 / 50.5 M (Table 1 truncates them to 7 / 25 / 50),
# which count the backbone without the 1000-class head.
TABLE1 = {
    'plainmamba-l1_in1k': dict(flops=3.0, params=7.3, whole=False),
    'plainmamba-l2_in1k': dict(flops=8.1, params=25.7, whole=False),
    'plainmamba-l3_in1k': dict(flops=14.4, params=50.5, whole=False),
    'vim-t_in1k': dict(flops=1.50, params=7, whole=True),
    'vim-s_in1k': dict(flops=5.10, params=26, whole=True),
}


def _name(path: str) -> str:
    return osp.splitext(osp.basename(path))[0]


def test_every_cls_config_has_a_table1_entry():
    assert sorted(map(_name, CLS_CONFIGS)) == sorted(TABLE1)


@pytest.mark.parametrize('path', CLS_CONFIGS, ids=_name)
def test_cls_config_builds_and_runs(path):
    cfg = Config.fromfile(path)
    assert cfg.model.type == 'mmssm.SSMClassifier'
    assert cfg.model.num_classes == 1000
    backbone = cfg.model.backbone
    cls = MODELS.get(backbone.type)
    assert backbone.arch in cls.arch_zoo
    # shrink the depth to keep it fast
    backbone.arch = dict(cls.arch_zoo[backbone.arch], num_layers=2)
    model = MODELS.build(cfg.model).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, 1000)


@pytest.mark.parametrize('path', CLS_CONFIGS, ids=_name)
def test_cls_config_matches_table1(path):
    """FLOPs within 3% of Table 1, params within 3% of the reference."""
    target = TABLE1[_name(path)]
    model = MODELS.build(Config.fromfile(path).model).to('meta')
    report = count_flops(model, torch.randn(1, 3, 224, 224, device='meta'))
    assert report.total / 1e9 == pytest.approx(target['flops'], rel=0.03)
    part = model if target['whole'] else model.backbone
    params = sum(p.numel() for p in part.parameters()) / 1e6
    assert params == pytest.approx(target['params'], rel=0.03)


# --------------------------------------------------------------------------
# Detection configs (configs/mask_rcnn, configs/retinanet)
# --------------------------------------------------------------------------
DET_FOLDERS = ('mask_rcnn', 'retinanet')
DET_CONFIGS = sorted(
    path
    for folder in DET_FOLDERS
    for path in glob.glob(osp.join(ROOT, 'configs', folder, '*.py'))
)
DET_FULL = [p for p in DET_CONFIGS if p.endswith('8xb2-1x_coco.py')]
DET_BACKBONES = (
    'plainmamba-l1',
    'plainmamba-l2',
    'plainmamba-l3',
    'vim-t',
    'vim-s',
)
# the config name's pruning field -> the backbone's prune_cfg
DET_PRUNING = {
    '': None,
    '-prune': 'paper',
    '-naive': dict(schedule='paper', align=False),
}
# The arch of each backbone shrunk to 4 layers of 64 channels; 'prune' is
# the schedule that prune_cfg='paper' takes from the arch.
TINY_PRUNE = dict(layers=(2,), keep_ratios=0.5)
TINY_ARCH = {
    'mmssm.PlainMamba': dict(
        embed_dims=64,
        num_layers=4,
        num_convs=1,
        dw_layers=[0],
        d_state=8,
        expand=1,
        conv_size=3,
        prune=TINY_PRUNE,
    ),
    'mmssm.Vim': dict(
        embed_dims=64,
        num_layers=4,
        patch_size=16,
        stride=16,
        d_state=8,
        expand=1,
        d_conv=4,
        cls_token=None,
        prune=TINY_PRUNE,
    ),
}


def _base_depth(path: str) -> int:
    """The longest chain of ``_base_`` files above a config."""
    with open(path) as f:
        tree = ast.parse(f.read())
    bases = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == '_base_' for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            bases = [value] if isinstance(value, str) else list(value)
    folder = osp.dirname(path)
    return max(
        (1 + _base_depth(osp.normpath(osp.join(folder, b))) for b in bases),
        default=0,
    )


def _det_shrink(cfg: Config) -> Config:
    """A CPU-sized copy of a detection config's model."""
    adapter = cfg.model.backbone
    backbone = adapter.backbone
    backbone.arch = dict(TINY_ARCH[backbone.type])
    backbone.init_cfg = None
    adapter.update(
        interaction_indexes=[[0, 1], [2, 3]],
        deform_num_heads=4,
        conv_inplane=16,
    )
    cfg.model.neck.update(in_channels=[64] * 4, out_channels=32)
    if cfg.model.type == 'MaskRCNN':
        cfg.merge_from_dict(
            {
                'model.rpn_head.in_channels': 32,
                'model.rpn_head.feat_channels': 32,
                'model.roi_head.bbox_roi_extractor.out_channels': 32,
                'model.roi_head.bbox_head.in_channels': 32,
                'model.roi_head.bbox_head.conv_out_channels': 32,
                'model.roi_head.bbox_head.fc_out_channels': 64,
                'model.roi_head.mask_roi_extractor.out_channels': 32,
                'model.roi_head.mask_head.in_channels': 32,
                'model.roi_head.mask_head.conv_out_channels': 32,
                'model.train_cfg.rpn_proposal.max_per_img': 100,
                'model.train_cfg.rcnn.sampler.num': 64,
                'model.test_cfg.rpn.max_per_img': 100,
            }
        )
    else:
        cfg.model.bbox_head.update(
            in_channels=32, feat_channels=32, stacked_convs=1
        )
    return cfg


def test_det_configs_are_all_there():
    names = {_name(p) for p in DET_FULL}
    expected = {
        f'{algo}_{backbone}{pruning}_adapter-fpn_8xb2-1x_coco'
        for algo in ('mask-rcnn', 'retinanet')
        for backbone in DET_BACKBONES
        for pruning in DET_PRUNING
    }
    assert names == expected
    assert len(DET_FULL) == 30


@pytest.mark.parametrize('path', DET_FULL, ids=_name)
def test_det_config_settings(path):
    """The settings of DESIGN.md section 4 and the STYLE.md conventions."""
    name = _name(path)
    algo, backbone_field = name.split('_')[:2]
    size = backbone_field.split('-')[1]
    pruning = backbone_field[len('-'.join(backbone_field.split('-')[:2])) :]
    cfg = Config.fromfile(path)
    assert _base_depth(path) <= 3
    assert cfg.default_scope == 'mmdet'
    assert cfg.custom_imports == dict(
        imports=['mmssm.models', 'mmssm.engine'], allow_failed_imports=False
    )
    adapter = cfg.model.backbone
    backbone = adapter.backbone
    assert adapter.type == 'mmssm.ViTAdapter'
    family = backbone_field.split('-')[0]
    assert (
        backbone.type
        == {'plainmamba': 'mmssm.PlainMamba', 'vim': 'mmssm.Vim'}[family]
    )
    assert backbone.arch == {'t': 'tiny', 's': 'small'}.get(size, size)
    assert backbone.prune_cfg == DET_PRUNING[pruning]
    assert backbone.final_norm is False
    if family == 'vim':
        assert backbone.cls_token is None
    # weights: a converted checkpoint named at the top, prefix backbone.
    assert backbone.init_cfg == dict(
        type='Pretrained', checkpoint=cfg.ckpt, prefix='backbone.'
    )
    assert cfg.ckpt.startswith('checkpoints/') and size in cfg.ckpt
    embed = MODELS.get(backbone.type).arch_zoo[backbone.arch]['embed_dims']
    assert cfg.model.neck.in_channels == [embed] * 4
    assert cfg.model.neck.out_channels == 256
    assert cfg.model.neck.num_outs == 5
    heads, indexes = (
        (8, [[0, 8], [9, 17], [18, 26], [27, 35]])
        if (size == 'l3')
        else (6, [[0, 5], [6, 11], [12, 17], [18, 23]])
    )
    assert adapter.deform_num_heads == heads
    assert adapter.interaction_indexes == indexes
    assert (adapter.conv_inplane, adapter.n_points) == (64, 4)
    assert (adapter.cffn_ratio, adapter.deform_ratio) == (0.25, 1.0)
    assert adapter.init_values == 0 and adapter.add_vit_feature
    assert adapter.norm_cfg == dict(type='SyncBN', requires_grad=True)
    # optimizer and schedule
    optim = cfg.optim_wrapper
    assert optim.constructor == 'mmssm.SSMOptimWrapperConstructor'
    assert optim.optimizer == dict(
        type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05
    )
    assert optim.paramwise_cfg.norm_decay_mult == 0
    assert optim.paramwise_cfg.bias_decay_mult == 0
    assert set(optim.paramwise_cfg.no_decay_names) >= {
        'pos_embed',
        'level_embed',
        'A_log',
        'D',
        'direction_Bs',
    }
    assert cfg.train_cfg.max_epochs == 12
    warmup, steps = cfg.param_scheduler
    assert warmup.type == 'LinearLR' and not warmup.by_epoch
    assert steps.type == 'MultiStepLR' and steps.milestones == [8, 11]
    # 8 GPUs x 2 images
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.auto_scale_lr.base_batch_size == 16
    resize = [t for t in cfg.train_pipeline if t.type == 'Resize']
    flip = [t for t in cfg.train_pipeline if t.type == 'RandomFlip']
    assert resize[0].scale == (1333, 800) and flip[0].prob == 0.5
    if algo == 'mask-rcnn':
        assert cfg.model.type == 'MaskRCNN'
        assert cfg.model.roi_head.bbox_head.type == 'Shared4Conv1FCBBoxHead'
        assert optim.get('clip_grad') is None
    else:
        assert cfg.model.type == 'RetinaNet'
        assert cfg.model.neck.start_level == 1
        assert cfg.model.neck.add_extra_convs == 'on_output'
        assert optim.clip_grad == dict(max_norm=35, norm_type=2)


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models on a shared CPU run faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize('path', DET_FULL, ids=_name)
def test_det_config_builds_and_runs(path, one_thread):
    """Build (shrunk, no pretrained weights) and run loss/predict/tensor."""
    from mmdet.registry import MODELS as DET_MODELS
    from mmdet.testing import demo_mm_inputs
    from mmdet.utils import register_all_modules

    import mmssm.engine  # noqa: F401

    register_all_modules()

    cfg = _det_shrink(Config.fromfile(path))
    model = DET_MODELS.build(cfg.model)
    model.init_weights()
    pruning = cfg.model.backbone.backbone.prune_cfg
    pruner = model.backbone.backbone.pruner
    if pruning is None:
        assert pruner is None
    else:
        assert pruner.layers == TINY_PRUNE['layers']
        assert pruner.align is (pruning == 'paper')
    with_mask = cfg.model.type == 'MaskRCNN'
    data = demo_mm_inputs(
        2, [[3, 96, 96], [3, 64, 96]], num_classes=80, with_mask=with_mask
    )
    data = model.data_preprocessor(data, True)
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
    data = model.data_preprocessor(
        demo_mm_inputs(1, [[3, 96, 64]], num_classes=80), False
    )
    with torch.no_grad():
        results = model(**data, mode='predict')
        feats = model(**data, mode='tensor')
    assert len(results) == 1
    pred = results[0].pred_instances
    assert pred.bboxes.shape[1] == 4
    if with_mask:
        assert pred.masks.shape[1:] == (96, 64)
    assert len(feats) > 0


def test_det_mini_config(monkeypatch):
    """The smoke-test config: the project's own mini COCO set, CPU-sized."""
    path = osp.join(
        ROOT,
        'configs',
        'mask_rcnn',
        'mask-rcnn_plainmamba-l1-prune_adapter-fpn_1xb2-mini_coco-persons.py',
    )
    assert _base_depth(path) <= 3
    cfg = Config.fromfile(path)
    assert 'SyncBN' not in str(cfg.model)  # one process: plain BN
    backbone = cfg.model.backbone.backbone
    assert backbone.init_cfg is None and backbone.prune_cfg == 'paper'
    assert cfg.model.roi_head.bbox_head.num_classes == 1
    assert cfg.model.roi_head.mask_head.num_classes == 1
    assert cfg.model.test_cfg.rcnn.score_thr == 0  # always something to eval
    monkeypatch.chdir(ROOT)  # paths are relative to the repository
    for part in ('train', 'val', 'test'):
        dataset = cfg[f'{part}_dataloader'].dataset
        assert dataset.metainfo.classes == ('person',)
        assert osp.isfile(osp.join(dataset.data_root, dataset.ann_file))
        assert osp.isdir(osp.join(dataset.data_root, dataset.data_prefix.img))
        resize = [t for t in dataset.pipeline if t.type == 'Resize']
        assert resize[0].scale == (320, 320)
    assert osp.isfile(cfg.val_evaluator.ann_file)
    assert cfg.test_evaluator.metric == ['bbox', 'segm']
    assert osp.isfile(
        osp.join(ROOT, 'data', 'coco_persons_mini', 'SOURCE.txt')
    )
