"""Configs load with mmengine, build from the registry and run.

The ImageNet-1K classification configs (model only) of configs/plainmamba
and configs/vim, and their FLOPs/params against the paper's Table 1; the
detection configs of configs/mask_rcnn and configs/retinanet (settings,
build and run, optimizer); and the conventions of every detection and
segmentation config (inheritance, shared fragments, upstream bases
inherited by scope, one primitive per family). The segmentation configs
have their own settings and run tests in test_configs_seg.py.
"""

import ast
import glob
import importlib.util
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmssm.registry import MODELS
from mmssm.utils.flops import count_flops

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


def test_det_configs_are_all_there(configs):
    names = {_name(p) for p in DET_FULL}
    expected = {
        f'{algo}_{backbone}{pruning}_adapter-fpn_8xb2-1x_coco'
        for algo in ('mask-rcnn', 'retinanet')
        for backbone in configs.backbones
        for pruning in configs.pruning
    }
    assert names == expected
    assert len(DET_FULL) == 30


@pytest.mark.parametrize('path', DET_FULL, ids=_name)
def test_det_config_settings(path, configs):
    """The settings of the detectors released with PlainMamba.

    Mask R-CNN (Shared4Conv1FC box head) or RetinaNet (FPN from stride 8,
    extra convs on the outputs, gradient clipping at 35) on the ViT-Adapter,
    an FPN of 5 levels of 256 channels on the adapter's 4 maps; AdamW lr
    1e-4, weight decay 0.05 by the SSM constructor, none on norms and
    biases (and on the SSM parameters: see
    ``test_det_optimizer_spares_the_ssm_parameters``); 12 epochs, steps at
    8 and 11; 8 GPUs x 2 images; 1333x800 resize and flip.
    """
    algo, backbone_field = _name(path).split('_')[:2]
    cfg = Config.fromfile(path)
    assert cfg.default_scope == 'mmdet'
    assert cfg.custom_imports == dict(
        imports=['mmssm.models', 'mmssm.engine'], allow_failed_imports=False
    )
    configs.check_adapter_settings(cfg, backbone_field)
    backbone = cfg.model.backbone.backbone
    embed = MODELS.get(backbone.type).arch_zoo[backbone.arch]['embed_dims']
    assert cfg.model.neck.in_channels == [embed] * 4
    assert cfg.model.neck.out_channels == 256
    assert cfg.model.neck.num_outs == 5
    # optimizer and schedule
    optim = cfg.optim_wrapper
    assert optim.constructor == 'mmssm.SSMOptimWrapperConstructor'
    assert optim.optimizer == dict(
        type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05
    )
    # nothing else: the SSM parameters are spared by their own flags
    assert optim.paramwise_cfg == dict(norm_decay_mult=0, bias_decay_mult=0)
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
def test_det_config_builds_and_runs(path, one_thread, configs, det_scope):
    """Build (shrunk, no pretrained weights) and run loss/predict/tensor."""
    from mmdet.registry import MODELS as DET_MODELS
    from mmdet.testing import demo_mm_inputs

    import mmssm.engine  # noqa: F401

    cfg = configs.shrink_detector(Config.fromfile(path))
    model = DET_MODELS.build(cfg.model)
    model.init_weights()
    configs.check_pruner(cfg, model)
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


# Parameters that the SSM optimizer must spare, by their own name: the
# SSMs' A_log and D (and Vim's backward A_b_log and D_b), PlainMamba's
# direction_Bs, the position embedding, the class token and the adapter's
# level embedding.
NO_DECAY_NAMES = (
    'A_log',
    'A_b_log',
    'D',
    'D_b',
    'direction_Bs',
    'pos_embed',
    'cls_token',
    'level_embed',
)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(
        module, (_BatchNorm, nn.LayerNorm, nn.GroupNorm)
    ) or type(module).__name__.endswith('Norm')


def _weight_decays(model: nn.Module, optim_wrapper: Config) -> tuple:
    """The weight decay of each parameter of ``model`` in the optimizer
    that ``optim_wrapper`` builds for it, and the names of the parameters
    of its norm layers."""
    from mmengine.optim import build_optim_wrapper

    import mmssm.engine  # noqa: F401

    wrapper = build_optim_wrapper(model, optim_wrapper)
    by_id = {}
    for group in wrapper.optimizer.param_groups:
        assert group['lr'] == optim_wrapper.optimizer.lr
        for p in group['params']:
            by_id[id(p)] = group['weight_decay']
    decays = {n: by_id[id(p)] for n, p in model.named_parameters()}
    norms = {
        f'{prefix}.{n}' if prefix else n
        for prefix, module in model.named_modules()
        if _is_norm(module)
        for n, _ in module.named_parameters(recurse=False)
    }
    return decays, norms


@pytest.mark.parametrize(
    'name',
    [
        'mask-rcnn_plainmamba-l1-prune_adapter-fpn_8xb2-1x_coco',
        'retinanet_vim-t-naive_adapter-fpn_8xb2-1x_coco',
    ],
)
def test_det_optimizer_spares_the_ssm_parameters(name, configs, det_scope):
    """No weight decay on the parameters of NO_DECAY_NAMES, on norms (any
    class whose name ends with Norm, batch norms included) nor on biases;
    0.05 on every other parameter."""
    from mmdet.registry import MODELS as DET_MODELS

    folder = name.split('_')[0].replace('-', '_')
    path = osp.join(ROOT, 'configs', folder, f'{name}.py')
    cfg = configs.shrink_detector(Config.fromfile(path))
    model = DET_MODELS.build(cfg.model)
    decays, norms = _weight_decays(model, cfg.optim_wrapper)
    spared = set()
    for n, decay in decays.items():
        if (
            n.rsplit('.', 1)[-1] in NO_DECAY_NAMES
            or n in norms
            or n.endswith('.bias')
        ):
            spared.add(n.rsplit('.', 1)[-1])
            assert decay == 0, n
        else:
            assert decay == 0.05, n
    family = {'plainmamba': 'direction_Bs', 'vim': 'A_b_log'}
    expected = {'A_log', 'D', 'pos_embed', 'level_embed', 'bias'}
    expected.add(family[name.split('_')[1].split('-')[0]])
    assert expected <= spared
    assert norms


# --------------------------------------------------------------------------
# Conventions of the detection and segmentation configs
# --------------------------------------------------------------------------
DENSE_FOLDERS = DET_FOLDERS + ('upernet',)
DENSE_CONFIGS = sorted(
    path
    for folder in DENSE_FOLDERS
    for path in glob.glob(osp.join(ROOT, 'configs', folder, '*.py'))
)


def _bases(path: str) -> list:
    """The ``_base_`` entries of a config file, as written."""
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == '_base_' for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            return [value] if isinstance(value, str) else list(value)
    return []


def _base_file(base: str, path: str) -> str:
    """The file of a ``_base_`` entry of ``path``; ``scope::rel`` is
    ``rel`` in the configs that the package of that scope installs (as
    mmengine finds them)."""
    if '::' in base:
        scope, rel = base.split('::')
        package = osp.dirname(importlib.util.find_spec(scope).origin)
        return osp.join(package, '.mim', 'configs', rel)
    return osp.normpath(osp.join(osp.dirname(path), base))


def _base_depth(path: str) -> int:
    """The longest chain of ``_base_`` files above a config."""
    return max(
        (1 + _base_depth(_base_file(b, path)) for b in _bases(path)),
        default=0,
    )


def _family(path: str) -> str:
    return _name(path).split('_')[1].split('-')[0]


@pytest.mark.parametrize('path', DENSE_CONFIGS, ids=_name)
def test_dense_config_conventions(path):
    """How the detection and segmentation configs are written.

    * at most 3 levels of ``_base_`` files above a config (an upstream
      base counts as a level);
    * the blocks that the primitives share, the ViT-Adapter and the SSM
      optimizer, come from the ``configs/_base_`` fragments and are never
      restated;
    * no ``no_decay_names``: the optimizer constructor spares the
      parameters that the models tag ``_no_weight_decay``;
    * a ``-naive`` config is its dense config with the paper's schedule
      without alignment, without ``_delete_``.
    """
    assert _base_depth(path) <= 3
    for base in _bases(path):
        assert osp.isfile(_base_file(base, path)), base
    with open(path) as f:
        text = f.read()
    assert "type='mmssm.ViTAdapter'" not in text
    assert 'mmssm.SSMOptimWrapperConstructor' not in text
    assert 'no_decay_names' not in text
    if '-naive' in _name(path):
        dense = _name(path).replace('-naive', '')
        assert _bases(path) == [f'./{dense}.py']
        assert '_delete_' not in text


def test_upstream_bases_are_inherited_not_copied():
    """The toolboxes' own bases are inherited through ``mmdet::``,
    ``mmseg::`` and ``mmpretrain::`` (the wheels ship them): configs/_base_
    holds only mmssm's fragments, and every scoped base a config names
    loads."""
    ours = sorted(
        osp.relpath(p, osp.join(ROOT, 'configs', '_base_'))
        for p in glob.glob(osp.join(ROOT, 'configs', '_base_', '**', '*.py'))
    )
    assert ours == [
        'models/plainmamba_cls.py',
        'models/ssm_vit_adapter.py',
        'models/vim_cls.py',
        'schedules/adamw_ssm.py',
    ]
    scoped = {
        b
        for p in glob.glob(osp.join(ROOT, 'configs', '*', '*.py'))
        for b in _bases(p)
        if '::' in b
    }
    assert {b.split('::')[0] for b in scoped} == {
        'mmdet',
        'mmseg',
        'mmpretrain',
    }
    for base in scoped:
        assert osp.isfile(_base_file(base, ROOT)), base


@pytest.mark.parametrize('folder', DENSE_FOLDERS)
def test_one_primitive_per_folder_and_family(folder):
    """A folder has one primitive config per backbone family (its bases
    are all upstream files or fragments); every other config inherits one
    of its own family (a Vim config never replaces the backbone of a
    PlainMamba one)."""
    primitives = {}
    for path in glob.glob(osp.join(ROOT, 'configs', folder, '*.py')):
        local = [
            base
            for base in _bases(path)
            if osp.dirname(_base_file(base, path)) == osp.dirname(path)
        ]
        if not local:
            primitives.setdefault(_family(path), []).append(_name(path))
        for base in local:
            assert _family(_base_file(base, path)) == _family(path), path
    assert sorted(primitives) == ['plainmamba', 'vim']
    for family, names in primitives.items():
        assert len(names) == 1, (family, names)


# Parameters of the dense detectors released with PlainMamba (M).
RELEASE_PARAMS = {
    ('mask-rcnn', 'l1'): 31,
    ('mask-rcnn', 'l2'): 53,
    ('mask-rcnn', 'l3'): 79,
    ('retinanet', 'l1'): 19,
    ('retinanet', 'l2'): 40,
    ('retinanet', 'l3'): 67,
}


@pytest.fixture(scope='module')
def dense_det_params():
    """Parameters (M) of the full-size dense PlainMamba detectors."""
    from mmdet.registry import MODELS as DET_MODELS
    from mmdet.utils import register_all_modules
    from mmengine.registry import DefaultScope

    from mmssm.utils.flops import count_params

    # the 'mmdet' scope only while building: this module's later tests
    # build unscoped (tests/conftest.py restores the scope only after the
    # module)
    register_all_modules(init_default_scope=False)
    params = {}
    with DefaultScope.overwrite_default_scope('mmdet'):
        for algo, arch in RELEASE_PARAMS:
            path = osp.join(
                ROOT,
                'configs',
                algo.replace('-', '_'),
                f'{algo}_plainmamba-{arch}_adapter-fpn_8xb2-1x_coco.py',
            )
            model = DET_MODELS.build(Config.fromfile(path).model)
            params[algo, arch] = count_params(model) / 1e6
            del model
    return params


def test_det_params_match_the_release(dense_det_params):
    """Within 3% of the release, except RetinaNet-L2: the release's 40 M
    cannot be matched by the head that its own Mask R-CNN / RetinaNet pairs
    of L1 and L3 imply (see configs/retinanet/README.md); the heads differ
    by the same amount for every arch here."""
    for key, params in dense_det_params.items():
        if key != ('retinanet', 'l2'):
            assert abs(params / RELEASE_PARAMS[key] - 1) <= 0.03, key
    heads = [
        dense_det_params['mask-rcnn', a] - dense_det_params['retinanet', a]
        for a in ('l1', 'l2', 'l3')
    ]
    assert max(heads) - min(heads) < 0.1, heads


def test_det_mini_config(monkeypatch, configs):
    """The smoke-test config: the project's own mini COCO set, CPU-sized."""
    path = osp.join(
        ROOT,
        'configs',
        'mask_rcnn',
        'mask-rcnn_plainmamba-l1-prune_adapter-fpn_1xb2-mini_coco-persons.py',
    )
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
