"""The segmentation configs (configs/upernet) load, build and run.

UperNet + ViT-Adapter on ADE20K for PlainMamba-L1/L2/L3 and Vim-T/S, and
UperNet on PlainMamba-L1/L2/L3 without the adapter (the released
segmentors' architecture), each dense, pruned with the paper's schedule
(aligned) and naively pruned, plus the mini config of ``data/ade20k_mini``:
their settings (those of the segmentors released with PlainMamba), the
weight decay of their optimizer, and every one of them built with a shrunk
backbone and run through loss, backward, predict and tensor on the CPU.
How they are written (inheritance, upstream bases, one primitive per
family) is tested with the detection configs in test_configs.py.
"""

import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config

from mmssm.engine.hooks import DyVMAuxLossHook
from mmssm.registry import MODELS
from mmssm.utils.preflight import config_task

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SEG_CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', 'upernet', '*.py')))
SEG_FULL = [
    p for p in SEG_CONFIGS if p.endswith('8xb2-160k_ade20k-512x512.py')
]
# Vim's released segmentation architecture: UperNet on the plain backbone
# (Feature2Pyramid), dense and DyVM, on DyVM's 80k schedule
SEG_VIM = [p for p in SEG_CONFIGS if p.endswith('8xb2-80k_ade20k-512x512.py')]
SEG_MINI = osp.join(
    ROOT,
    'configs',
    'upernet',
    'upernet_plainmamba-l1-prune_adapter_1xb2-mini_ade20k-256x256.py',
)
NUM_CLASSES = 150


def _name(path: str) -> str:
    return osp.splitext(osp.basename(path))[0]


def _seg_shrink(cfg: Config, configs) -> Config:
    """A CPU-sized copy of a segmentation config's model."""
    configs.shrink_backbone(cfg)
    if cfg.model.get('neck') is not None:  # Feature2Pyramid
        cfg.model.neck.embed_dim = 64
    cfg.model.decode_head.update(in_channels=[64] * 4, channels=32)
    cfg.model.auxiliary_head.update(in_channels=64, channels=16)
    cfg.model.data_preprocessor.size = (64, 64)
    return cfg


def _pipeline_types(pipeline) -> list:
    return [t['type'] for t in pipeline]


def test_seg_configs_are_all_there(configs):
    names = {_name(p) for p in SEG_FULL}
    expected = {
        f'upernet_{backbone}{pruning}{neck}_8xb2-160k_ade20k-512x512'
        for backbone in configs.backbones
        for pruning in configs.pruning
        for neck in ('_adapter', '')
        if neck
        or (backbone.startswith('plainmamba') and '-dyvm' not in pruning)
    }
    assert names == expected
    assert len(SEG_FULL) == 25 + 9
    assert {_name(p) for p in SEG_VIM} == {
        f'upernet_vim-{size}{pruning}_8xb2-80k_ade20k-512x512'
        for size in ('t', 's')
        for pruning in ('', '-dyvm', '-dyvm-align')
    }
    assert set(SEG_CONFIGS) == set(SEG_FULL) | set(SEG_VIM) | {SEG_MINI}


@pytest.mark.parametrize('path', SEG_CONFIGS, ids=_name)
def test_seg_config_is_an_mmseg_config(path, configs):
    """The tools run it with mmseg (they read the default scope)."""
    cfg = Config.fromfile(path)
    assert config_task(cfg) == 'mmseg'
    assert cfg.custom_imports == dict(
        imports=['mmssm.models', 'mmssm.engine', 'mmssm.datasets.transforms'],
        allow_failed_imports=False,
    )


@pytest.mark.parametrize('path', SEG_FULL, ids=_name)
def test_seg_config_settings(path, configs):
    """The settings of the segmentors released with PlainMamba.

    UperNet on the adapter's 4 maps (or, without the adapter, on the
    outputs of the last layer of each quarter of the backbone), the
    auxiliary FCN head (loss weight 0.4) on the 4th; 150 classes, SyncBN,
    ``whole`` inference; 512x512 crops of the ADE20K 2048x512 scale, labels
    outside the classes ignored; AdamW lr 6e-5, weight decay 0.01 by the
    SSM constructor, none on norms (and on the SSM parameters: see
    ``test_seg_optimizer_spares_the_ssm_parameters``); linear warm-up for
    1500 iterations, then poly to 0 at 160k; 8 GPUs x 2 images.
    """
    backbone_field = _name(path).split('_')[1]
    family, size = backbone_field.split('-')[:2]
    cfg = Config.fromfile(path)
    model = cfg.model
    assert model.type == 'EncoderDecoder'
    assert model.get('pretrained') is None
    # backbone: the adapter around the SSM backbone, or the SSM backbone
    if '_adapter_' in _name(path):
        configs.check_adapter_settings(cfg, backbone_field)
        backbone = model.backbone.backbone
    else:
        configs.check_plain_backbone_settings(cfg, backbone_field)
        backbone = model.backbone
    assert tuple(backbone.img_size) == (512, 512)
    if family != 'vim':
        assert backbone.norm_cfg == dict(type='SyncBN', requires_grad=True)
    drop_path = {'l1': 0.1, 'l2': 0.2, 'l3': 0.3, 't': 0.1, 's': 0.2}
    assert backbone.drop_path_rate == drop_path[size]
    # heads: UperNet on the 4 maps, auxiliary FCN on index 3
    embed = MODELS.get(backbone.type).arch_zoo[backbone.arch]['embed_dims']
    head = model.decode_head
    assert head.type == 'UPerHead'
    assert head.in_channels == [embed] * 4
    assert head.in_index == [0, 1, 2, 3]
    assert head.channels == 512 and tuple(head.pool_scales) == (1, 2, 3, 6)
    assert head.num_classes == NUM_CLASSES
    assert head.loss_decode.loss_weight == 1.0
    aux = model.auxiliary_head
    assert aux.type == 'FCNHead'
    assert (aux.in_channels, aux.in_index) == (embed, 3)
    assert aux.num_classes == NUM_CLASSES
    assert aux.loss_decode.loss_weight == 0.4
    for module in (head, aux):
        assert module.norm_cfg == dict(type='SyncBN', requires_grad=True)
    assert model.test_cfg.mode == 'whole'
    # data: 512x512 crops, the ADE20K 2048x512 scale, labels outside the
    # classes ignored (IgnoreOutOfRangeLabels after LoadAnnotations)
    assert cfg.default_scope == 'mmseg'
    assert tuple(model.data_preprocessor.size) == (512, 512)
    assert model.data_preprocessor.seg_pad_val == 255
    train = cfg.train_dataloader.dataset.pipeline
    test = cfg.test_dataloader.dataset.pipeline
    assert cfg.train_dataloader.dataset.type == 'ADE20KDataset'
    crop = [t for t in train if t.type == 'RandomCrop']
    assert tuple(crop[0].crop_size) == (512, 512)
    assert [t.scale for t in train if t.type == 'RandomResize'] == [
        (2048, 512)
    ]
    assert [t.scale for t in test if t.type == 'Resize'] == [(2048, 512)]
    for pipeline in (train, test):
        types = _pipeline_types(pipeline)
        i = types.index('LoadAnnotations')
        assert pipeline[i].reduce_zero_label is True
        assert types[i + 1] == 'mmssm.IgnoreOutOfRangeLabels'
        assert pipeline[i + 1].num_classes == NUM_CLASSES
    assert cfg.val_dataloader.dataset.pipeline == test
    assert cfg.test_evaluator.type == 'IoUMetric'
    # optimizer and schedule: AdamW 6e-5 / 0.01, warm-up 1500, poly, 160k
    optim = cfg.optim_wrapper
    assert optim.constructor == 'mmssm.SSMOptimWrapperConstructor'
    assert optim.optimizer == dict(
        type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01
    )
    # nothing else: the SSM parameters are spared by their own flags
    assert optim.paramwise_cfg == dict(norm_decay_mult=0)
    assert optim.get('clip_grad') is None
    warmup, poly = cfg.param_scheduler
    assert warmup.type == 'LinearLR' and not warmup.by_epoch
    assert (warmup.begin, warmup.end) == (0, 1500)
    assert poly.type == 'PolyLR' and not poly.by_epoch
    assert (poly.begin, poly.end) == (1500, 160000)
    assert (poly.power, poly.eta_min) == (1.0, 0.0)
    assert cfg.train_cfg.type == 'IterBasedTrainLoop'
    assert cfg.train_cfg.max_iters == 160000
    # 8 GPUs x 2 images = 16 images per step
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.auto_scale_lr.base_batch_size == 16
    assert cfg.custom_hooks == [dict(type='mmssm.PruningMetaHook')]


@pytest.mark.parametrize('path', SEG_VIM, ids=_name)
def test_seg_vim_config_settings(path, configs):
    """Vim's released segmentation architecture and DyVM's schedule.

    UperNet on the plain Vim (no class token, no final norm) tapped after
    layers 6, 12, 18, 24, its four stride-16 maps made a pyramid by mmseg's
    ``Feature2Pyramid`` (rescales 4, 2, 1, 0.5); heads and data as in the
    folder's other configs; AdamW lr 6e-5 (T) / 1.2e-4 (S), weight decay
    0.01, warm-up 1500 then poly to 0 at 80k, gradient clipping at 5;
    ``-dyvm``: DyVM's learned pruner (keep 0.9**s T, 0.8**s S) and
    direction gates.
    """
    backbone_field = _name(path).split('_')[1]
    size = backbone_field.split('-')[1]
    pruning = backbone_field[len(f'vim-{size}') :]
    cfg = Config.fromfile(path)
    model = cfg.model
    backbone = model.backbone
    assert backbone.type == 'mmssm.Vim'
    assert backbone.arch == {'t': 'tiny', 's': 'small'}[size]
    assert backbone.cls_token is None and backbone.final_norm is False
    assert tuple(backbone.out_indices) == (5, 11, 17, 23)
    assert tuple(backbone.img_size) == (512, 512)
    assert backbone.init_cfg == dict(
        type='Pretrained', checkpoint=cfg.ckpt, prefix='backbone.'
    )
    if pruning:
        expected = configs.dyvm_prune_cfg(size, pruning == '-dyvm-align')
        assert backbone.prune_cfg == expected
        assert backbone.direction_gate is True
    else:
        assert backbone.get('prune_cfg') is None
        assert not backbone.get('direction_gate', False)
    embed = {'t': 192, 's': 384}[size]
    neck = model.neck
    assert neck.type == 'Feature2Pyramid' and neck.embed_dim == embed
    assert list(neck.rescales) == [4, 2, 1, 0.5]
    assert model.decode_head.type == 'UPerHead'
    assert model.decode_head.in_channels == [embed] * 4
    assert model.auxiliary_head.in_channels == embed
    assert model.auxiliary_head.in_index == 3
    optim = cfg.optim_wrapper
    assert optim.optimizer.type == 'AdamW'
    assert optim.optimizer.lr == {'t': 6e-5, 's': 1.2e-4}[size]
    assert optim.optimizer.weight_decay == 0.01
    assert optim.clip_grad == dict(max_norm=5.0, norm_type=2)
    warmup, poly = cfg.param_scheduler
    assert (warmup.type, warmup.begin, warmup.end) == ('LinearLR', 0, 1500)
    assert (poly.type, poly.begin, poly.end) == ('PolyLR', 1500, 80000)
    assert (poly.power, poly.eta_min) == (1.0, 0.0)
    assert cfg.train_cfg.max_iters == 80000
    assert cfg.train_dataloader.batch_size == 2


def _inputs(sizes, ori_sizes=None, seed=0):
    """Images and data samples (with random labels) as a dataloader's."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    gen = torch.Generator().manual_seed(seed)
    ori_sizes = ori_sizes or sizes
    inputs, samples = [], []
    for (h, w), (oh, ow) in zip(sizes, ori_sizes):
        inputs.append(torch.randint(0, 256, (3, h, w), generator=gen))
        sample = SegDataSample()
        label = torch.randint(0, NUM_CLASSES, (1, h, w), generator=gen)
        label[:, : h // 4] = 255  # some ignored pixels
        sample.gt_sem_seg = PixelData(data=label)
        sample.set_metainfo(dict(img_shape=(h, w), ori_shape=(oh, ow)))
        samples.append(sample)
    return dict(
        inputs=[x.to(torch.uint8) for x in inputs], data_samples=samples
    )


@pytest.mark.parametrize('path', SEG_CONFIGS, ids=_name)
def test_seg_config_builds_and_runs(path, configs, seg_scope):
    """Build (shrunk, no pretrained weights), loss/backward/predict/tensor."""
    from mmseg.registry import MODELS as SEG_MODELS

    import mmssm.engine  # noqa: F401

    cfg = _seg_shrink(Config.fromfile(path), configs)
    model = SEG_MODELS.build(cfg.model)
    model.init_weights()
    configs.check_pruner(cfg, model)
    # training: two crops, padded to the data preprocessor's 64x64
    data = model.data_preprocessor(_inputs([(64, 64), (48, 64)]), True)
    assert data['inputs'].shape == (2, 3, 64, 64)
    model.train()
    dyvm = '-dyvm' in _name(path)
    assert DyVMAuxLossHook().register(model) is dyvm  # its ratio losses
    losses = model(**data, mode='loss')
    aux = {'loss_token_ratio', 'loss_direction_ratio'} if dyvm else set()
    keep = {'token_keep', 'direction_keep'} if dyvm else set()
    assert set(losses) == {
        'decode.loss_ce',
        'decode.acc_seg',
        'aux.loss_ce',
        'aux.acc_seg',
        *aux,
        *keep,
    }
    total = losses['decode.loss_ce'] + losses['aux.loss_ce']
    total = total + sum(losses[k] for k in aux)
    assert torch.isfinite(total)
    total.backward()
    no_grad = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and p.grad is None
    ]
    assert not no_grad, no_grad[:10]
    # inference: an odd-sized image, predicted at its original size
    model.eval()
    data = model.data_preprocessor(_inputs([(50, 70)], [(75, 105)]), False)
    with torch.no_grad():
        results = model(**data, mode='predict')
        logits = model(**data, mode='tensor')
    assert len(results) == 1
    assert results[0].pred_sem_seg.shape == (75, 105)
    assert results[0].seg_logits.data.shape == (NUM_CLASSES, 75, 105)
    pred = results[0].pred_sem_seg.data
    assert pred.min() >= 0 and pred.max() < NUM_CLASSES
    assert logits.shape[:2] == (1, NUM_CLASSES)


@pytest.mark.parametrize(
    'name',
    [
        'upernet_plainmamba-l1-prune_adapter_8xb2-160k_ade20k-512x512',
        'upernet_vim-t-naive_adapter_8xb2-160k_ade20k-512x512',
        'upernet_plainmamba-l2-naive_8xb2-160k_ade20k-512x512',
    ],
)
def test_seg_optimizer_spares_the_ssm_parameters(name, configs, seg_scope):
    """No weight decay on the SSMs' A_log and D (and Vim's A_b_log and
    D_b), PlainMamba's direction_Bs, the position and level embeddings,
    nor on norms (any class whose name ends with Norm, batch norms
    included); 0.01 on every other parameter, biases included."""
    from mmengine.optim import build_optim_wrapper
    from mmseg.registry import MODELS as SEG_MODELS
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm

    import mmssm.engine  # noqa: F401

    path = osp.join(ROOT, 'configs', 'upernet', f'{name}.py')
    cfg = _seg_shrink(Config.fromfile(path), configs)
    model = SEG_MODELS.build(cfg.model)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    by_id = {}
    for group in wrapper.optimizer.param_groups:
        assert group['lr'] == 6e-5
        for p in group['params']:
            by_id[id(p)] = group['weight_decay']
    norms = {
        id(p)
        for module in model.modules()
        if isinstance(module, (_BatchNorm, nn.LayerNorm, nn.GroupNorm))
        or type(module).__name__.endswith('Norm')
        for p in module.parameters(recurse=False)
    }
    no_decay = ('A_log', 'A_b_log', 'D', 'D_b', 'direction_Bs')
    no_decay += ('pos_embed', 'cls_token', 'level_embed')
    spared = set()
    for n, p in model.named_parameters():
        if n.rsplit('.', 1)[-1] in no_decay or id(p) in norms:
            spared.add(n.rsplit('.', 1)[-1])
            assert by_id[id(p)] == 0, n
        else:
            assert by_id[id(p)] == 0.01, n
    expected = {'A_log', 'D', 'pos_embed', 'weight', 'bias'}  # + norms
    expected.add('direction_Bs' if 'plainmamba' in name else 'A_b_log')
    if '_adapter_' in name:
        expected.add('level_embed')
    assert expected <= spared
    assert by_id[id(model.decode_head.conv_seg.bias)] == 0.01


def test_seg_mini_config(monkeypatch, configs):
    """The smoke-test config: the project's own mini ADE20K set."""
    cfg = Config.fromfile(SEG_MINI)
    assert 'SyncBN' not in str(cfg.model)  # one process: plain BN
    backbone = cfg.model.backbone.backbone
    assert backbone.init_cfg is None and backbone.prune_cfg == 'paper'
    assert cfg.model.decode_head.num_classes == NUM_CLASSES
    assert tuple(cfg.model.data_preprocessor.size) == (256, 256)
    assert cfg.train_cfg.max_iters == cfg.train_cfg.val_interval == 8
    monkeypatch.chdir(ROOT)  # paths are relative to the repository
    for part in ('train', 'val', 'test'):
        loader = cfg[f'{part}_dataloader']
        assert loader.num_workers == 0
        dataset = loader.dataset
        assert dataset.type == 'ADE20KDataset'
        for prefix in dataset.data_prefix.values():
            folder = osp.join(dataset.data_root, prefix)
            assert len(glob.glob(osp.join(folder, 'ADE_val_*'))) == 3
        types = _pipeline_types(dataset.pipeline)
        i = types.index('LoadAnnotations')
        assert types[i + 1] == 'mmssm.IgnoreOutOfRangeLabels'
    crop = [
        t
        for t in cfg.train_dataloader.dataset.pipeline
        if t.type == 'RandomCrop'
    ]
    assert tuple(crop[0].crop_size) == (256, 256)
    assert cfg.test_evaluator.type == 'IoUMetric'
    assert osp.isfile(osp.join(ROOT, 'data', 'ade20k_mini', 'SOURCE.txt'))


# Parameters of the dense UperNets released with PlainMamba (M), whose
# backbone feeds four stride-16 maps straight to the heads.
RELEASE_SEG_PARAMS = {'l1': 35, 'l2': 55, 'l3': 81}


def test_seg_params_match_the_release(seg_scope):
    """The adapter-free configs within 3% of the release; the adapter
    configs differ from them by the adapter's own parameters only."""
    from mmseg.registry import MODELS as SEG_MODELS

    from mmssm.utils.flops import count_params

    for arch, release in RELEASE_SEG_PARAMS.items():
        params = {}
        for neck in ('', '_adapter'):
            name = f'upernet_plainmamba-{arch}{neck}_8xb2-160k_ade20k-512x512'
            path = osp.join(ROOT, 'configs', 'upernet', f'{name}.py')
            model = SEG_MODELS.build(Config.fromfile(path).model)
            params[neck] = count_params(model)
            if neck:
                adapter = count_params(model.backbone) - count_params(
                    model.backbone.backbone
                )
            del model
        assert abs(params[''] / 1e6 / release - 1) <= 0.03, (arch, params)
        # the plain backbone's ln1 and 3 output norms, absent in the adapter
        out_norms = (
            4 * 2 * MODELS.get('mmssm.PlainMamba').arch_zoo[arch]['embed_dims']
        )
        assert params['_adapter'] - adapter == params[''] - out_norms, arch
