from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

from mmssm.testing import TINY_PRUNE, shrink_prune_cfg, tiny_arch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Seeded, and one thread: the suite's tensors are small, and on a
    shared 2-core machine OpenMP teams of 2 mostly wait for each other.
    Tests of threading set their own count."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def det_scope():
    """mmdet as mmengine's default scope for one test, restored after it."""
    with DefaultScope.overwrite_default_scope('mmdet'):
        yield


@pytest.fixture
def seg_scope():
    """mmseg as mmengine's default scope for one test, restored after it."""
    with DefaultScope.overwrite_default_scope('mmseg'):
        yield


# --------------------------------------------------------------------------
# The detection and segmentation configs (test_configs*.py)
# --------------------------------------------------------------------------
CONFIG_BACKBONES = (
    'plainmamba-l1',
    'plainmamba-l2',
    'plainmamba-l3',
    'vim-t',
    'vim-s',
)
# the config name's pruning field -> the backbone's prune_cfg
CONFIG_PRUNING = {
    '': None,
    '-prune': 'paper',
    '-naive': dict(schedule='paper', align=False),
    # DyVM's learned pruning (configs/_base_/models/dyvm_dense.py): by size
    '-dyvm': False,
    '-dyvm-align': True,
}


def dyvm_prune_cfg(size: str, align: bool) -> dict:
    """The learned pruner of a ``-dyvm`` det/seg config: after each
    quarter of the layers, cumulative keep 0.9 (Vim-T) or 0.8."""
    return dict(
        type='mmssm.LearnedTokenPruner',
        layers=(9, 18, 27) if size == 'l3' else (6, 12, 18),
        keep_ratios=0.9 if size == 't' else 0.8,
        align=align,
    )


# The arch of each backbone shrunk to 4 layers of 64 channels.
TINY_ARCH = {
    'mmssm.PlainMamba': tiny_arch(
        'plainmamba', embed_dims=64, d_state=8, expand=1
    ),
    'mmssm.Vim': tiny_arch(
        'vim', embed_dims=64, d_state=8, expand=1, cls_token=None
    ),
}


def is_adapter(backbone: Config) -> bool:
    """Whether a det/seg config's backbone is the ViT-Adapter (else an SSM
    backbone on its own, as the adapter-free UperNet configs)."""
    return backbone.type == 'mmssm.ViTAdapter'


def shrink_backbone(cfg: Config) -> None:
    """Shrink the SSM backbone of a det/seg config in place: ``TINY_ARCH``
    and no pretrained weights; an adapter gets two interactions, a backbone
    on its own returns its four layers."""
    backbone = cfg.model.backbone
    if is_adapter(backbone):
        backbone.update(
            interaction_indexes=[[0, 1], [2, 3]],
            deform_num_heads=4,
            conv_inplane=16,
        )
        backbone = backbone.backbone
    else:
        backbone.out_indices = (0, 1, 2, 3)
    backbone.arch = dict(TINY_ARCH[backbone.type])
    prune_cfg = backbone.get('prune_cfg')
    if isinstance(prune_cfg, dict) and 'Learned' in prune_cfg.get('type', ''):
        # a learned pruner's steps, moved into the tiny arch's layers
        backbone.prune_cfg = dict(prune_cfg, layers=TINY_PRUNE['layers'])
    else:
        backbone.prune_cfg = shrink_prune_cfg(prune_cfg)
    backbone.init_cfg = None


def shrink_detector(cfg: Config) -> Config:
    """A CPU-sized copy of a detection config's model."""
    shrink_backbone(cfg)
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


def check_pruner(cfg: Config, model) -> None:
    """The pruner of a model built from a shrunk config: its prune_cfg's."""
    backbone_cfg, backbone = cfg.model.backbone, model.backbone
    if is_adapter(backbone_cfg):
        backbone_cfg, backbone = backbone_cfg.backbone, backbone.backbone
    pruning = backbone_cfg.get('prune_cfg')
    if pruning is None:
        assert backbone.pruner is None
    else:
        assert backbone.pruner.layers == TINY_PRUNE['layers']
        assert backbone.pruner.align is pruning.get('align', True)


def _check_ssm_backbone(
    cfg: Config, backbone: Config, backbone_field: str
) -> None:
    """The SSM backbone of a full det or seg config: its type, arch and
    pruning from the config name's backbone field, its weights."""
    family, size = backbone_field.split('-')[:2]
    pruning = backbone_field[len(f'{family}-{size}') :]
    assert (
        backbone.type
        == {'plainmamba': 'mmssm.PlainMamba', 'vim': 'mmssm.Vim'}[family]
    )
    assert backbone.arch == {'t': 'tiny', 's': 'small'}.get(size, size)
    # a dense config leaves prune_cfg to the backbone's default, None
    expected = CONFIG_PRUNING[pruning]
    if pruning.startswith('-dyvm'):
        expected = dyvm_prune_cfg(size, align=expected)
        assert backbone.direction_gate is True
    assert backbone.get('prune_cfg') == expected
    if family == 'vim':
        assert backbone.cls_token is None
    # weights: a converted checkpoint named at the top, prefix backbone.
    assert backbone.init_cfg == dict(
        type='Pretrained', checkpoint=cfg.ckpt, prefix='backbone.'
    )
    assert cfg.ckpt.startswith('checkpoints/') and size in cfg.ckpt


def check_adapter_settings(cfg: Config, backbone_field: str) -> None:
    """The adapter and its SSM backbone of a full det or seg config.

    The released adapter's hyper-parameters (64 stem channels, 4 points, 6
    heads, 8 for L3, interaction groups by quarter, cffn 0.25, SyncBN) that
    the detection and segmentation configs share; ``backbone_field`` is
    the config name's backbone field (``plainmamba-l1-prune``, ``vim-t``).
    """
    adapter = cfg.model.backbone
    assert adapter.type == 'mmssm.ViTAdapter'
    _check_ssm_backbone(cfg, adapter.backbone, backbone_field)
    assert adapter.backbone.final_norm is False
    size = backbone_field.split('-')[1]
    heads, indexes = (
        (8, [[0, 8], [9, 17], [18, 26], [27, 35]])
        if size == 'l3'
        else (6, [[0, 5], [6, 11], [12, 17], [18, 23]])
    )
    assert adapter.deform_num_heads == heads
    assert adapter.interaction_indexes == indexes
    assert (adapter.conv_inplane, adapter.n_points) == (64, 4)
    assert (adapter.cffn_ratio, adapter.deform_ratio) == (0.25, 1.0)
    assert adapter.init_values == 0 and adapter.add_vit_feature
    assert adapter.norm_cfg == dict(type='SyncBN', requires_grad=True)


def check_plain_backbone_settings(cfg: Config, backbone_field: str) -> None:
    """An SSM backbone without the adapter, as PlainMamba's released
    segmentors: the outputs of the last layer of each quarter, final norm
    on."""
    backbone = cfg.model.backbone
    _check_ssm_backbone(cfg, backbone, backbone_field)
    assert backbone.final_norm is True
    size = backbone_field.split('-')[1]
    assert tuple(backbone.out_indices) == (
        (8, 17, 26, 35) if size == 'l3' else (5, 11, 17, 23)
    )


@pytest.fixture(scope='session')
def configs():
    """The helpers above, for the det and seg config tests."""
    return SimpleNamespace(
        backbones=CONFIG_BACKBONES,
        pruning=CONFIG_PRUNING,
        shrink_backbone=shrink_backbone,
        shrink_detector=shrink_detector,
        dyvm_prune_cfg=dyvm_prune_cfg,
        check_pruner=check_pruner,
        check_adapter_settings=check_adapter_settings,
        check_plain_backbone_settings=check_plain_backbone_settings,
    )
