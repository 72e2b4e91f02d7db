import ast
import os.path as osp
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config

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
}
# The arch of each backbone shrunk to 4 layers of 64 channels.
TINY_ARCH = {
    'mmssm.PlainMamba': tiny_arch(
        'plainmamba', embed_dims=64, d_state=8, expand=1
    ),
    'mmssm.Vim': tiny_arch(
        'vim', embed_dims=64, d_state=8, expand=1, cls_token=None
    ),
}


def base_depth(path: str) -> int:
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
        (1 + base_depth(osp.normpath(osp.join(folder, b))) for b in bases),
        default=0,
    )


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
    backbone.prune_cfg = shrink_prune_cfg(backbone.prune_cfg)
    backbone.init_cfg = None


def check_pruner(cfg: Config, model) -> None:
    """The pruner of a model built from a shrunk config: its prune_cfg's."""
    backbone_cfg, backbone = cfg.model.backbone, model.backbone
    if is_adapter(backbone_cfg):
        backbone_cfg, backbone = backbone_cfg.backbone, backbone.backbone
    pruning = backbone_cfg.prune_cfg
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
    assert backbone.prune_cfg == CONFIG_PRUNING[pruning]
    if family == 'vim':
        assert backbone.cls_token is None
    # weights: a converted checkpoint named at the top, prefix backbone.
    assert backbone.init_cfg == dict(
        type='Pretrained', checkpoint=cfg.ckpt, prefix='backbone.'
    )
    assert cfg.ckpt.startswith('checkpoints/') and size in cfg.ckpt


def check_adapter_settings(cfg: Config, backbone_field: str) -> None:
    """The adapter and its SSM backbone of a full det or seg config.

    The settings of DESIGN.md section 4 that the detection and segmentation
    configs share; ``backbone_field`` is the config name's backbone field
    (``plainmamba-l1-prune``, ``vim-t``...).
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


def check_optimizer_settings(
    optim: Config, lr: float, weight_decay: float
) -> None:
    """AdamW by the SSM constructor, without decay on norms and SSM params."""
    assert optim.constructor == 'mmssm.SSMOptimWrapperConstructor'
    assert optim.optimizer == dict(
        type='AdamW', lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay
    )
    assert optim.paramwise_cfg.norm_decay_mult == 0
    assert set(optim.paramwise_cfg.no_decay_names) >= {
        'pos_embed',
        'level_embed',
        'A_log',
        'D',
        'direction_Bs',
    }


@pytest.fixture(scope='session')
def configs():
    """The helpers above, for the det and seg config tests."""
    return SimpleNamespace(
        backbones=CONFIG_BACKBONES,
        pruning=CONFIG_PRUNING,
        base_depth=base_depth,
        shrink_backbone=shrink_backbone,
        check_pruner=check_pruner,
        check_adapter_settings=check_adapter_settings,
        check_plain_backbone_settings=check_plain_backbone_settings,
        check_optimizer_settings=check_optimizer_settings,
    )
