import copy
import importlib.util
import os.path as osp

import pytest
import torch
import torch.nn.functional as F

from mmssm.errors import UserError
from mmssm.models.backbones.plainmamba import (
    PlainMamba,
    PlainMambaLayer,
    PlainMambaMixer,
    scan_orders,
)
from mmssm.models.classifiers import build_classifier
from mmssm.models.layers import resize_pos_embed
from mmssm.models.utils.ckpt_convert import convert_plainmamba
from mmssm.ops import selective_scan_ref
from mmssm.registry import MODELS
from mmssm.testing import needs_ext, tiny_arch

TOOL = osp.join(
    osp.dirname(__file__),
    '..',
    '..',
    'tools',
    'model_converters',
    'plainmamba2mmssm.py',
)

# 16 channels, 2 layers, L1's layout (1 stem conv, DW block after layer 0)
TINY = tiny_arch('plainmamba', num_layers=2, conv_size=7)


def tiny(**kwargs):
    cfg = dict(arch=dict(TINY), img_size=64)
    cfg.update(kwargs)
    return PlainMamba(**cfg)


def randomise(module, seed=0):
    """Move parameters and BN statistics away from their init values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith('num_batches_tracked'):
                continue
            noise = torch.randn(t.shape, generator=gen, dtype=t.dtype)
            if name.endswith('running_var'):
                t.copy_(1 + 0.1 * noise.abs())
            else:
                t.add_(0.1 * noise)


def random_token_index(batch, K, L, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack(
        [
            torch.randperm(L, generator=gen)[:K].sort().values
            for _ in range(batch)
        ]
    )


# --------------------------------------------------------------------------
# Scan orders
# --------------------------------------------------------------------------
@pytest.mark.parametrize('hw', [(2, 3), (3, 2), (3, 3), (4, 4), (1, 4)])
def test_scan_orders(hw):
    H, W = hw
    orders, ranks, moves = scan_orders(hw)
    L = H * W
    assert orders.shape == ranks.shape == moves.shape == (4, L)
    for d in range(4):
        assert sorted(orders[d].tolist()) == list(range(L))
        assert torch.equal(ranks[d][orders[d]], torch.arange(L))
        assert moves[d, 0] == 0
    # directions 2 and 4 are 1 and 3 reversed
    assert torch.equal(orders[1], orders[0].flip(0))
    assert torch.equal(orders[3], orders[2].flip(0))
    # row snake from the top-left; the reversed one starts in the bottom
    # row, at the right end for odd H; column snake from the top-left, the
    # reversed one starts in the right column, at the bottom for odd W
    assert orders[0, 0] == 0 and orders[2, 0] == 0
    assert orders[1, 0] == (L - 1 if H % 2 else (H - 1) * W)
    assert orders[3, 0] == (L - 1 if W % 2 else W - 1)


def test_scan_orders_2x3():
    orders, _, moves = scan_orders((2, 3))
    # 0 1 2
    # 3 4 5
    assert orders.tolist() == [
        [0, 1, 2, 5, 4, 3],
        [3, 4, 5, 2, 1, 0],
        [0, 3, 4, 1, 2, 5],
        [5, 2, 1, 4, 3, 0],
    ]
    # start, right, left, up, down = 0, 1, 2, 3, 4
    assert moves.tolist() == [
        [0, 1, 1, 4, 2, 2],
        [0, 1, 1, 3, 2, 2],
        [0, 4, 1, 3, 1, 4],
        [0, 3, 2, 4, 2, 3],
    ]


# --------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------
def test_output_shapes():
    model = tiny(img_size=224, out_indices=(0, -1)).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 224, 224))
        assert [o.shape for o in outs] == [(1, 16, 14, 14)] * 2
        # any size: padded to a multiple of 16 at the bottom and right
        outs = model(torch.randn(2, 3, 112, 137))
        assert [o.shape for o in outs] == [(2, 16, 7, 9)] * 2
    pooled = tiny(out_type='avg_featmap').eval()
    with torch.no_grad():
        outs = pooled(torch.randn(2, 3, 112, 137))
    assert len(outs) == 1 and outs[0].shape == (2, 16)


def test_out_indices():
    model = tiny(arch=dict(TINY, num_layers=3), out_indices=[-3, 1, 2])
    assert model.out_indices == (0, 1, 2)
    # its own LayerNorm (eps 1e-6) for an inner layer, ln1 for the last
    assert model.norm_layer0.eps == 1e-6 and model.ln1.eps == 1e-6
    assert not hasattr(model, 'norm_layer2')
    assert model.layers[0].norm.eps == 1e-5
    model.eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 48, 64))
    assert len(outs) == 3 and outs[0].shape == (1, 16, 3, 4)
    assert tiny(out_indices=1).out_indices == (1,)
    for bad in (2, -3, [0, 5]):
        with pytest.raises(ValueError, match='out_indices'):
            tiny(out_indices=bad)


def test_arch():
    assert PlainMamba('L1').arch_settings == PlainMamba.arch_zoo['l1']
    s = PlainMamba.arch_zoo['l3']
    assert (s['embed_dims'], s['num_layers'], s['num_convs']) == (448, 36, 2)
    with pytest.raises(ValueError, match='l4'):
        PlainMamba(arch='l4')
    for key in TINY:
        arch = {k: v for k, v in TINY.items() if k != key}
        with pytest.raises(ValueError, match=key):
            PlainMamba(arch=arch)
    with pytest.raises(ValueError, match='out_type'):
        tiny(out_type='cls_token')
    with pytest.raises(ValueError, match='frozen_stages'):
        tiny(frozen_stages=3)
    model = MODELS.build(dict(type='PlainMamba', arch=dict(TINY)))
    assert isinstance(model, PlainMamba)
    assert hasattr(model.layers[0], 'dw') and not hasattr(
        model.layers[1], 'dw'
    )


@pytest.mark.parametrize('with_cp', [False, True])
def test_grads_reach_every_parameter(with_cp):
    model = tiny(out_indices=(0, 1), with_cp=with_cp, drop_path_rate=0.1)
    model.train()
    outs = model(torch.randn(2, 3, 64, 48))
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_with_cp_same_grads():
    ref, ckpt = tiny(), tiny(with_cp=True)
    ckpt.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for m in (ref, ckpt):
        m.train()
        m(x)[0].square().sum().backward()
    grads = dict(ref.named_parameters())
    for name, param in ckpt.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad)


def test_frozen_stages_and_norm_eval():
    model = tiny(frozen_stages=1, norm_eval=True)
    model.train()
    assert not model.pos_embed.requires_grad
    for m in (model.patch_embed, model.layers[0]):
        assert not m.training
        assert not any(p.requires_grad for p in m.parameters())
    assert model.layers[1].training
    assert all(p.requires_grad for p in model.layers[1].parameters())
    assert all(p.requires_grad for p in model.ln1.parameters())
    model = tiny(norm_eval=True)
    model.train()
    assert not model.patch_embed.stem[1].training
    assert not model.layers[0].dw[1].training
    assert model.layers[0].norm.training
    model = tiny(frozen_stages=2)
    model.train()
    assert not any(p.requires_grad for p in model.ln1.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    model = tiny(frozen_stages=0)
    model.train()
    assert not model.patch_embed.training and model.layers[0].training


def test_pos_embed_resize_on_load(tmp_path):
    src = tiny(img_size=224)  # 14 x 14
    dst = tiny(img_size=112)  # 7 x 7
    dst.load_state_dict(src.state_dict())
    expected = resize_pos_embed(src.pos_embed.detach(), (14, 14), (7, 7))
    assert torch.equal(dst.pos_embed.detach(), expected)
    # the same through init_cfg, from a classifier checkpoint
    path = str(tmp_path / 'ckpt.pth')
    torch.save(
        {
            'state_dict': {
                f'backbone.{k}': v for k, v in src.state_dict().items()
            }
        },
        path,
    )
    model = tiny(
        img_size=112,
        init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'),
    )
    model.init_weights()
    assert torch.equal(model.pos_embed.detach(), expected)
    torch.testing.assert_close(
        model.layers[1].mamba.A_log, src.layers[1].mamba.A_log
    )
    with pytest.raises(ValueError, match='pos_embed'):
        dst.load_state_dict(
            {'pos_embed': torch.zeros(1, 10, 16)}, strict=False
        )


def test_init_and_tags():
    model = tiny()
    mixer = model.layers[0].mamba
    A = torch.arange(1, 5, dtype=torch.float32).repeat(32, 1)
    torch.testing.assert_close(mixer.A_log.detach(), torch.log(A))
    assert torch.equal(mixer.D.detach(), torch.ones(32))
    dt = F.softplus(mixer.dt_proj.bias.detach())
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    assert mixer.direction_Bs.shape == (5, 4)
    for p in (mixer.A_log, mixer.D, mixer.direction_Bs, model.pos_embed):
        assert p._no_weight_decay
    assert mixer.in_proj.bias is not None and mixer.out_proj.bias is not None


def test_real_arch_sizes():
    """Sizes of the released models (built on the meta device).

    The paper's 7.3 / 25.7 / 50.5 M are the backbones without the head
    (truncated to one decimal); with the 1000-class head they are 7.55 /
    26.15 / 50.96 M.
    """
    expected = {'l1': 7_358_656, 'l2': 25_760_832, 'l3': 50_507_456}
    for arch, count in expected.items():
        with torch.device('meta'):
            model = build_classifier(dict(type='PlainMamba', arch=arch))
        backbone = sum(p.numel() for p in model.backbone.parameters())
        assert backbone == count, arch
        total = sum(p.numel() for p in model.parameters())
        assert total == count + 1000 * (model.backbone.embed_dims + 1)
        keys = set(model.state_dict())
        # the official checkpoint's key layout
        assert {
            'backbone.patch_embed.stem.0.weight',
            'backbone.patch_embed.stem.1.running_mean',
            'backbone.patch_embed.convs.1.weight',
            'backbone.patch_embed.projection.bias',
            'backbone.pos_embed',
            'backbone.layers.0.norm.weight',
            'backbone.layers.0.mamba.in_proj.bias',
            'backbone.layers.0.mamba.conv2d.bias',
            'backbone.layers.0.mamba.x_proj.weight',
            'backbone.layers.0.mamba.dt_proj.bias',
            'backbone.layers.0.mamba.out_proj.bias',
            'backbone.layers.0.mamba.A_log',
            'backbone.layers.0.mamba.D',
            'backbone.layers.0.mamba.direction_Bs',
            'backbone.ln1.bias',
            'head.fc.weight',
            'head.fc.bias',
        } <= keys
        assert ('backbone.layers.0.dw.1.running_var' in keys) == (arch == 'l1')
        assert ('backbone.patch_embed.convs.4.weight' in keys) == (
            arch != 'l1'
        )
        assert set(convert_plainmamba(model.state_dict())) == keys


# --------------------------------------------------------------------------
# Mixer: dense vs pruned
# --------------------------------------------------------------------------
def make_mixer(scan_impl='ref'):
    mixer = PlainMambaMixer(
        8, d_state=4, conv_size=3, scan_impl=scan_impl
    ).double()
    with torch.no_grad():
        mixer.direction_Bs.normal_()
        mixer.dt_proj.bias.normal_(-1, 0.5)
    return mixer


@pytest.mark.parametrize('gap_mode', ['prev', 'null', 'none'])
@pytest.mark.parametrize(
    'scan_impl,dtype', [('ref', torch.float64), ('auto', torch.float32)]
)
def test_all_tokens_kept_equals_dense(gap_mode, scan_impl, dtype):
    layer = PlainMambaLayer(8, dict(d_state=4, conv_size=3))
    layer.mamba = make_mixer(scan_impl)
    layer = layer.to(dtype).eval()
    hw = (3, 5)
    x = torch.randn(2, 15, 8, dtype=dtype)
    token_index = torch.arange(15).expand(2, -1)
    dense, y_dense = layer(x, hw)
    pruned, y = layer(x, hw, token_index, gap_mode=gap_mode)
    assert torch.equal(pruned, dense) and torch.equal(y, y_dense)


def full_length_reference(mixer, x, hw, token_index, gap_mode):
    """The aligned pruned mixer as four full-length dense scans.

    The alignment identities: 'prev' is the dense scan where a pruned step
    takes the step size of the previous kept step and B u = 0; 'null' the
    dense scan with u = 0, B = C = 0 and delta = softplus(bias) at pruned
    steps. Step s
    of the released model takes delta, B, C of the raster token s.
    """
    batch, K, _ = x.shape
    H, W = hw
    L = H * W
    E, N = mixer.d_inner, mixer.d_state
    xin, z = mixer.in_proj(x).chunk(2, dim=-1)
    grid = x.new_zeros(batch, L, E)
    kept = torch.zeros(batch, L, dtype=torch.bool)
    for b in range(batch):
        grid[b, token_index[b]] = xin[b]
        kept[b, token_index[b]] = True
    grid = grid.transpose(1, 2).reshape(batch, E, H, W)
    xc = F.silu(mixer.conv2d(grid)).flatten(2)  # (B, E, L)
    dt, Bm, Cm = mixer.x_proj(xc.transpose(1, 2)).split(
        [mixer.dt_rank, N, N], dim=-1
    )
    dt = (dt @ mixer.dt_proj.weight.T).transpose(1, 2)  # (B, E, L)
    bias = 2 * mixer.dt_proj.bias
    orders, _, moves = scan_orders(hw)
    y = x.new_zeros(batch, E, L)
    for d in range(4):
        o = orders[d]
        keep = kept[:, o]  # (B, L): is the token scanned at step s kept
        u = xc[:, :, o] * keep[:, None]
        delta = dt.clone()
        Bs = (Bm + mixer.direction_Bs[moves[d]]).transpose(1, 2).clone()
        Cs = Cm.transpose(1, 2).clone()
        for b in range(batch):
            last = None
            for s in range(L):
                if keep[b, s]:
                    last = s
                    continue
                Bs[b, :, s] = 0
                if gap_mode == 'null':
                    delta[b, :, s] = 0  # softplus(0 + bias)
                    Cs[b, :, s] = 0
                elif last is not None:  # 'prev'
                    delta[b, :, s] = delta[b, :, last]
        ys = selective_scan_ref(
            u,
            delta,
            -torch.exp(mixer.A_log),
            Bs,
            Cs,
            mixer.D,
            delta_bias=bias,
            delta_softplus=True,
        )
        y[:, :, o] += ys
    y = torch.stack([y[b, :, token_index[b]] for b in range(batch)])
    return y.transpose(1, 2) * F.silu(z)


@pytest.mark.parametrize('gap_mode', ['prev', 'null'])
def test_pruned_aligned_matches_full_length_reference(gap_mode):
    mixer = make_mixer()
    hw = (4, 5)
    token_index = random_token_index(2, 11, 20)
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    with torch.no_grad():
        _, y = mixer(x, hw, token_index, gap_mode=gap_mode)
        expected = full_length_reference(mixer, x, hw, token_index, gap_mode)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)


def test_pruned_naive_and_batch_consistency():
    mixer = make_mixer()
    hw = (4, 4)
    token_index = random_token_index(3, 9, 16, seed=1)
    x = torch.randn(3, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        naive, _ = mixer(x, hw, token_index, gap_mode='none')
        aligned, _ = mixer(x, hw, token_index)
        assert (aligned - naive).abs().max() > 1e-6
        for b in range(3):  # per-image token sets
            torch.testing.assert_close(
                aligned[b : b + 1],
                mixer(x[b : b + 1], hw, token_index[b : b + 1])[0],
                rtol=1e-12,
                atol=1e-12,
            )
    with pytest.raises(ValueError, match='positions'):
        mixer(x, hw)
    layer = PlainMambaLayer(8, dict(d_state=4), with_dwconv=True).double()
    with pytest.raises(ValueError, match='full token grid'):
        layer(x, hw, token_index)


@needs_ext
def test_scan_impl_ref_vs_cpu():
    ref = tiny(scan_impl='ref', out_indices=(0, 1)).double().eval()
    randomise(ref)
    cpu = tiny(scan_impl='cpu', out_indices=(0, 1)).double().eval()
    cpu.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 48, 64, dtype=torch.float64)
    outs = [m(x) for m in (ref, cpu)]
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    sum(o.sum() for o in outs[0]).backward()
    sum(o.sum() for o in outs[1]).backward()
    grads = dict(ref.named_parameters())
    for name, param in cpu.named_parameters():
        torch.testing.assert_close(
            param.grad, grads[name].grad, rtol=1e-9, atol=1e-9
        )
    # pruned, aligned
    mixers = [make_mixer('ref'), make_mixer('cpu')]
    mixers[1].load_state_dict(mixers[0].state_dict())
    token_index = random_token_index(2, 13, 30)
    x = torch.randn(2, 13, 8, dtype=torch.float64)
    for gap_mode in ('prev', 'null'):
        a, b = (m(x, (5, 6), token_index, gap_mode)[0] for m in mixers)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------
# Classifier and checkpoint conversion
# --------------------------------------------------------------------------
def tiny_classifier(**kwargs):
    return build_classifier(
        dict(type='PlainMamba', arch=dict(TINY), img_size=64, **kwargs), 10
    )


def test_classifier():
    """mmpretrain's ImageClassifier: the mean of the tokens after ln1 (the
    release's pooling) through ``head.fc``."""
    model = tiny_classifier().eval()
    assert type(model).__name__ == 'ImageClassifier'
    assert model.backbone.out_type == 'avg_featmap'
    assert model.head.fc.in_features == 16
    x = torch.randn(2, 3, 64, 80)
    featmap = tiny(img_size=64, out_type='featmap').eval()
    featmap.load_state_dict(model.backbone.state_dict())
    with torch.no_grad():
        logits = model(x)
        pooled = featmap(x)[-1].mean((2, 3))  # ln1 applied: final_norm
    assert logits.shape == (2, 10)
    torch.testing.assert_close(logits, model.head.fc(pooled))
    with pytest.raises(UserError, match='out_type'):
        build_classifier(
            dict(type='PlainMamba', arch=dict(TINY), out_type='featmap')
        )


def official_checkpoint(model):
    """A checkpoint in the official layout, with the EMA hook's buffers."""
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    for k in list(state_dict)[:3]:
        state_dict['ema_' + k.replace('.', '_')] = state_dict[k].clone()
    return {
        'meta': {'epoch': 300, 'CLASSES': ['a', 'b']},
        'state_dict': state_dict,
    }


def load_tool():
    spec = importlib.util.spec_from_file_location('plainmamba2mmssm', TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_convert_checkpoint(tmp_path):
    src = tiny_classifier().eval()
    randomise(src)
    checkpoint = official_checkpoint(src)
    assert any(k.startswith('ema_') for k in checkpoint['state_dict'])
    converted = convert_plainmamba(checkpoint)
    assert not any(k.startswith('ema_') for k in converted)
    dst = tiny_classifier().eval()
    dst.load_state_dict(converted, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
    bad = copy.copy(checkpoint['state_dict'])
    bad['backbone.layers.0.mamba.gamma'] = torch.ones(16)
    bad['neck.foo'] = torch.ones(1)
    with pytest.raises(KeyError, match=r'mamba\.gamma.*neck\.foo'):
        convert_plainmamba({'model': bad})

    # the command-line tool
    tool = load_tool()
    src_path, dst_path = str(tmp_path / 'l1.pth'), str(tmp_path / 'o.pth')
    torch.save(checkpoint, src_path)
    tool.main([src_path, dst_path])
    out = torch.load(dst_path, weights_only=True)
    assert out['meta']['source'] == 'l1.pth'
    dst = tiny_classifier().eval()
    dst.load_state_dict(out['state_dict'], strict=True)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
    with pytest.raises(SystemExit, match='missing.pth'):
        tool.main([str(tmp_path / 'missing.pth'), dst_path])
    torch.save({'state_dict': bad}, src_path)
    with pytest.raises(SystemExit, match='l1.pth'):
        tool.main([src_path, dst_path])
