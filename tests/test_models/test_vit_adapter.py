import copy
import os.path as osp

import pytest
import torch

from mmssm.models.backbones import PlainMamba, ViTAdapter
from mmssm.models.layers.adapter_modules import (
    Injector,
    grid_reference_points,
    level_inputs,
    token_reference_points,
)
from mmssm.registry import MODELS
from mmssm.testing import tiny_backbone_cfg

# 32 channels (16 per deformable head), 4 layers; PlainMamba in L1's layout
BACKBONES = {
    'plainmamba': tiny_backbone_cfg(
        'plainmamba', dict(embed_dims=32, conv_size=7)
    ),
    'vim': tiny_backbone_cfg('vim', dict(embed_dims=32, cls_token=None)),
}

# PlainMamba-L1's layout needs the full grid in layer 0: prune after 2, 3.
PRUNE_CFG = dict(layers=[2, 3], keep_ratios=0.5)


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """One intra-op thread: these tiny models only lose time to a second
    thread on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def adapter(name='plainmamba', backbone=None, **kwargs):
    cfg = dict(
        backbone=dict(BACKBONES[name], **(backbone or {})),
        conv_inplane=8,
        deform_num_heads=2,
    )
    cfg.update(kwargs)
    return ViTAdapter(**cfg)


def randomise(module, seed=0):
    """Move the parameters away from their (partly zero) init values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


# --------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['plainmamba', 'vim'])
@pytest.mark.parametrize('hw', [(64, 64), (96, 128), (112, 137)])
def test_output_shapes(name, hw):
    model = adapter(name).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, *hw))
    assert len(outs) == 4
    for out, stride in zip(outs, (4, 8, 16, 32)):
        # ceil(H / s): the sizes of a stride-s CNN (exact for 32 | H)
        expected = (2, 32, -(-hw[0] // stride), -(-hw[1] // stride))
        assert out.shape == expected
        assert torch.isfinite(out).all()


def test_padding_to_32_is_internal():
    """An input not divisible by 32 gives the crop of its padded input."""
    model = adapter().eval()
    randomise(model)
    x = torch.randn(1, 3, 112, 137)
    padded = torch.nn.functional.pad(x, (0, 160 - 137, 0, 128 - 112))
    with torch.no_grad():
        outs = model(x)
        ref = model(padded)
    for out, r in zip(outs, ref):
        torch.testing.assert_close(out, r[..., : out.shape[2], : out.shape[3]])


def test_build_from_registry_and_names():
    model = MODELS.build(
        dict(
            type='mmssm.ViTAdapter',
            backbone=BACKBONES['plainmamba'],
            conv_inplane=8,
            deform_num_heads=2,
        )
    )
    assert isinstance(model.backbone, PlainMamba)
    assert not model.backbone.final_norm  # the adapter's default
    keys = set(model.state_dict())
    # the names of the original adapter modules
    for key in (
        'level_embed',
        'spm.stem.0.weight',
        'spm.stem.1.running_mean',
        'spm.conv4.0.weight',
        'spm.fc4.bias',
        'interactions.0.injector.gamma',
        'interactions.0.injector.attn.sampling_offsets.weight',
        'interactions.0.extractor.ffn.dwconv.dwconv.weight',
        'interactions.3.extra_extractors.1.ffn_norm.weight',
        'up.weight',
        'ad_norm4.running_var',
        'backbone.layers.3.mamba.A_log',
    ):
        assert key in keys, key
    assert not any(k.startswith('interactions.2.extra_') for k in keys)
    assert model.level_embed._no_weight_decay


def test_norm_cfg():
    model = adapter(norm_cfg=dict(type='GN', num_groups=4))
    norms = [model.spm.stem[1], model.spm.conv3[1], model.ad_norm1]
    assert all(isinstance(m, torch.nn.GroupNorm) for m in norms)
    assert not any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        for name, m in model.named_modules()
        if not name.startswith('backbone')
    )
    model = adapter(norm_cfg=dict(type='SyncBN'))
    assert isinstance(model.ad_norm2, torch.nn.SyncBatchNorm)


def test_backbone_init_cfg(tmp_path):
    """Pretrained weights go to the inner backbone through its init_cfg."""
    source = adapter().backbone
    randomise(source)
    ckpt = tmp_path / 'backbone.pth'
    state = {'backbone.' + k: v for k, v in source.state_dict().items()}
    torch.save({'state_dict': state}, ckpt)
    init_cfg = dict(
        type='Pretrained', checkpoint=str(ckpt), prefix='backbone.'
    )
    model = adapter(backbone=dict(init_cfg=init_cfg))
    adapter_state = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if not k.startswith('backbone.')
    }
    model.init_weights()
    for k, v in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    for k, v in model.state_dict().items():  # the adapter keeps its init
        if not k.startswith('backbone.'):
            assert torch.equal(adapter_state[k], v), k


# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    'num_layers, expected',
    [
        (24, [[0, 5], [6, 11], [12, 17], [18, 23]]),
        (36, [[0, 8], [9, 17], [18, 26], [27, 35]]),
        (6, [[0, 1], [2, 3], [4, 4], [5, 5]]),
    ],
)
def test_default_interaction_indexes(num_layers, expected):
    arch = dict(
        BACKBONES['plainmamba']['arch'],
        embed_dims=16,
        num_layers=num_layers,
        d_state=2,
    )
    model = adapter(backbone=dict(arch=arch))
    assert [list(g) for g in model.interaction_indexes] == expected
    assert len(model.interactions) == 4


@pytest.mark.parametrize(
    'indexes',
    [[[0, 1], [3, 3]], [[0, 1], [2, 2]], [[1, 3]], [[0, 2], [2, 3]], [[0]]],
)
def test_bad_interaction_indexes(indexes):
    with pytest.raises(ValueError, match='interaction'):
        adapter(interaction_indexes=indexes)


def test_two_interactions_without_extra_extractors():
    model = adapter(
        interaction_indexes=[[0, 1], [2, 3]], use_extra_extractor=False
    ).eval()
    assert len(model.interactions) == 2
    assert all(b.extra_extractors is None for b in model.interactions)
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[-1] for o in outs] == [16, 8, 4, 2]


def test_vim_class_token_is_refused():
    with pytest.raises(ValueError, match='cls_token=None'):
        adapter(
            'vim',
            backbone=dict(
                arch=dict(BACKBONES['vim']['arch'], cls_token='middle')
            ),
        )
    with pytest.raises(ValueError, match='cls_token=None'):
        adapter('vim', backbone=dict(cls_token='middle'))


def test_final_norm_is_refused():
    with pytest.raises(ValueError, match='final_norm=False'):
        adapter(backbone=dict(final_norm=True))


def test_stride_8_grid_is_refused():
    model = adapter(
        'vim', backbone=dict(arch=dict(BACKBONES['vim']['arch'], stride=8))
    )
    with pytest.raises(ValueError, match='stride-16'):
        model(torch.randn(1, 3, 64, 64))


def test_drop_path_follows_backbone():
    model = adapter(backbone=dict(drop_path_rate=0.2))
    assert model.drop_path_rate == 0.2
    assert model.interactions[0].extractor.drop_path.drop_prob == 0.2
    assert model.interactions[3].extra_extractors[0].drop_path.drop_prob == 0.2
    model = adapter(backbone=dict(drop_path_rate=0.2), drop_path_rate=0.0)
    assert isinstance(
        model.interactions[0].extractor.drop_path, torch.nn.Identity
    )


# --------------------------------------------------------------------------
# Reference points and the pruned injector
# --------------------------------------------------------------------------
def test_reference_points():
    hw = (3, 5)
    grid = grid_reference_points([hw], 'cpu')
    index = torch.arange(15).expand(2, -1)
    tokens = token_reference_points(index, hw)
    assert tokens.shape == (2, 15, 1, 2)
    assert torch.equal(tokens, grid.expand(2, -1, -1, -1))
    # raster position 7 = row 1, column 2
    torch.testing.assert_close(grid[0, 7, 0], torch.tensor([2.5 / 5, 1.5 / 3]))
    shapes, start = level_inputs([(4, 6), (2, 3), (1, 2)], 'cpu')
    assert shapes.tolist() == [[4, 6], [2, 3], [1, 2]]
    assert start.tolist() == [0, 24, 30]


def test_injector_on_kept_tokens():
    """A kept token is injected as it is in the dense grid."""
    torch.manual_seed(0)
    injector = Injector(16, num_heads=2, init_values=1.0).eval()
    randomise(injector)
    prior_shapes = [(8, 8), (4, 4), (2, 2)]
    c = torch.randn(2, 84, 16)
    x = torch.randn(2, 16, 16)
    shapes, start = level_inputs(prior_shapes, 'cpu')
    with torch.no_grad():
        dense = injector(
            x, grid_reference_points([(4, 4)], 'cpu'), c, shapes, start
        )
        index = torch.stack(
            [torch.randperm(16)[:7].sort().values for _ in range(2)]
        )
        kept = x.gather(1, index[..., None].expand(-1, -1, 16))
        pruned = injector(
            kept, token_reference_points(index, (4, 4)), c, shapes, start
        )
    expected = dense.gather(1, index[..., None].expand(-1, -1, 16))
    torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------
def _check_grads(model, hw=(64, 96)):
    model.train()
    outs = model(torch.randn(2, 3, *hw))
    sum(o.square().mean() for o in outs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    zero = [
        n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0
    ]
    assert not zero, zero


@pytest.mark.parametrize('name', ['plainmamba', 'vim'])
def test_grads_reach_every_parameter(name):
    model = adapter(name, init_values=0.1)
    randomise(model)
    _check_grads(model)


def test_grads_with_default_init():
    """With gamma = 0 the injectors' attention gets zero gradient, but every
    parameter is still in the graph (no unused parameters)."""
    model = adapter()
    model.train()
    outs = model(torch.randn(2, 3, 64, 64))
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.interactions[0].injector.gamma.grad.abs().sum() > 0


def _same_weights(**kwargs):
    torch.manual_seed(0)
    model = adapter(**kwargs)
    torch.manual_seed(1)
    randomise(model)
    return model.eval()


def test_prior_gamma_one_is_the_released_adapter():
    """prior_gamma = 1 gives the released outputs; None adds no parameter
    (checkpoints keep their keys)."""
    released = _same_weights()
    assert released.prior_gamma is None
    assert not any('prior_gamma' in k for k in released.state_dict())
    gated = adapter(prior_gamma_init=1.0).eval()
    assert tuple(gated.prior_gamma.shape) == (4, 32)
    result = gated.load_state_dict(released.state_dict(), strict=False)
    assert result.missing_keys == ['prior_gamma']
    assert not result.unexpected_keys
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        for a, b in zip(released(x), gated(x)):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_prior_gamma_zero_is_the_spatial_prior():
    """At 0 the outputs are the spatial prior module's maps, normed, and the
    gammas (not yet the interactions) get the gradient."""
    model = _same_weights(prior_gamma_init=0.0)
    with torch.no_grad():
        model.prior_gamma.zero_()  # (randomised with the rest)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        outs = model(x)
        c1, *tokens = model.spm(x)
        maps = [c1] + [
            t.transpose(1, 2).reshape(2, -1, *hw)
            for t, hw in zip(tokens, ((8, 12), (4, 6), (2, 3)))
        ]
        for i, (out, m) in enumerate(zip(outs, maps)):
            expected = getattr(model, f'ad_norm{i + 1}')(m)
            assert torch.allclose(out, expected, atol=1e-6)
    model.train()
    sum(o.square().mean() for o in model(x)).backward()
    assert model.prior_gamma.grad.abs().min() > 0
    assert model.up.weight.grad.abs().sum() == 0
    assert getattr(model.prior_gamma, '_no_weight_decay', False)


def test_with_cp_same_grads():
    grads = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = adapter(
            init_values=0.1, with_cp=with_cp, backbone=dict(with_cp=with_cp)
        )
        randomise(model)
        model.train()
        x = torch.randn(
            2, 3, 64, 64, generator=torch.Generator().manual_seed(1)
        )
        sum(o.square().mean() for o in model(x)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, msg=n)


@pytest.mark.parametrize('name', list(BACKBONES))
def test_grads_with_pruning(name):
    model = adapter(name, init_values=0.1, backbone=dict(prune_cfg=PRUNE_CFG))
    randomise(model)
    _check_grads(model, hw=(96, 128))


# --------------------------------------------------------------------------
# Pruning
# --------------------------------------------------------------------------
@pytest.mark.parametrize('name', list(BACKBONES))
def test_keep_all_equals_dense(name):
    dense = adapter(name, init_values=0.1).eval()
    randomise(dense)
    pruned = adapter(
        name,
        init_values=0.1,
        backbone=dict(prune_cfg=dict(PRUNE_CFG, keep_ratios=1.0)),
    ).eval()
    pruned.load_state_dict(dense.state_dict())
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        for a, b in zip(dense(x), pruned(x)):
            assert torch.equal(a, b)


@pytest.mark.parametrize('name', list(BACKBONES))
def test_pruning_injects_kept_tokens_and_extracts_full_grid(name):
    model = adapter(
        name,
        init_values=0.1,
        backbone=dict(prune_cfg=dict(layers=[2], keep_ratios=0.5)),
    ).eval()
    randomise(model)
    queries, feats, states = [], [], []
    for block in model.interactions:
        block.injector.register_forward_pre_hook(
            lambda m, args: queries.append(args[0].shape[1])
        )
        block.extractor.register_forward_pre_hook(
            lambda m, args: feats.append(args[2].clone())
        )
    run_layers = model.backbone.run_layers

    def record(state, start, end):
        state = run_layers(state, start, end)
        states.append(state)
        return state

    model.backbone.run_layers = record
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 96, 128))
    L = 6 * 8
    # layer index 1 prunes half of the 48 tokens: the injectors of the
    # groups after it see the 24 kept tokens, the extractors the full grid
    assert queries == [L, L, L // 2, L // 2]
    assert [f.shape[1] for f in feats] == [L] * 4
    assert states[0].index is None and states[1].index.shape == (2, L // 2)
    # the pruned tokens stay frozen: later groups leave them as they were
    pruned = torch.ones(2, L, dtype=torch.bool)
    pruned.scatter_(1, states[1].index, False)
    assert pruned.sum() == 2 * (L - L // 2)
    for f in feats[2:]:
        assert torch.equal(f[pruned], feats[1][pruned])
        assert not torch.equal(f[~pruned], feats[1][~pruned])
    assert all(torch.isfinite(o).all() for o in outs)


# --------------------------------------------------------------------------
# Mask R-CNN
# --------------------------------------------------------------------------
def _mask_rcnn_cfg(backbone):
    mmdet = pytest.importorskip('mmdet')
    from mmengine.config import Config

    path = osp.join(
        osp.dirname(mmdet.__file__),
        '.mim',
        'configs',
        '_base_',
        'models',
        'mask-rcnn_r50_fpn.py',
    )
    if not osp.exists(path):
        pytest.skip('the mmdet wheel has no configs')
    cfg = Config.fromfile(path).model
    cfg.backbone = backbone
    cfg.neck.update(in_channels=[32] * 4, out_channels=16)
    cfg.rpn_head.update(in_channels=16, feat_channels=16)
    roi = cfg.roi_head
    roi.bbox_roi_extractor.out_channels = 16
    roi.mask_roi_extractor.out_channels = 16
    roi.bbox_head.update(in_channels=16, fc_out_channels=32, num_classes=3)
    roi.mask_head.update(
        num_convs=1, in_channels=16, conv_out_channels=16, num_classes=3
    )
    cfg.train_cfg.rpn_proposal.update(nms_pre=100, max_per_img=50)
    cfg.train_cfg.rcnn.sampler.num = 32
    cfg.test_cfg.rpn.update(nms_pre=100, max_per_img=50)
    return cfg


@pytest.mark.parametrize(
    'prune',
    [False, True],
)
def test_mask_rcnn_loss_and_predict(prune):
    backbone = dict(
        type='mmssm.ViTAdapter',
        backbone=dict(BACKBONES['plainmamba']),
        conv_inplane=8,
        deform_num_heads=2,
    )
    if prune:
        backbone['backbone']['prune_cfg'] = PRUNE_CFG
    cfg = _mask_rcnn_cfg(backbone)
    from mmdet.registry import MODELS as DET_MODELS
    from mmdet.testing import demo_mm_inputs
    from mmengine.registry import DefaultScope

    # a temporary default scope: a global one would leak into other tests
    with DefaultScope.overwrite_default_scope('mmdet'):
        detector = DET_MODELS.build(copy.deepcopy(cfg))
        assert isinstance(detector.backbone, ViTAdapter)
        inputs = demo_mm_inputs(
            2, [[3, 96, 128], [3, 80, 100]], num_classes=3, with_mask=True
        )
        detector.train()
        data = detector.data_preprocessor(inputs, True)
        losses = detector(**data, mode='loss')
        loss = sum(
            v if isinstance(v, torch.Tensor) else sum(v)
            for k, v in losses.items()
            if 'loss' in k
        )
        assert torch.isfinite(loss)
        loss.backward()
        assert detector.backbone.spm.fc1.weight.grad is not None
        detector.eval()
        with torch.no_grad():
            data = detector.data_preprocessor(inputs, False)
            results = detector(**data, mode='predict')
    assert len(results) == 2
    assert 'masks' in results[0].pred_instances
