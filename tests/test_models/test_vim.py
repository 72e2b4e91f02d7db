import argparse
import copy
import importlib.util
import os.path as osp

import pytest
import torch
import torch.nn.functional as F

from mmssm.models.backbones import Vim
from mmssm.models.backbones.vim import BiMambaV2
from mmssm.models.classifiers import build_classifier
from mmssm.models.layers import resize_pos_embed
from mmssm.models.utils.ckpt_convert import convert_vim
from mmssm.ops import selective_scan_ref
from mmssm.testing import needs_ext, tiny_arch

TINY = tiny_arch('vim', embed_dims=32, num_layers=2)


def tiny(**kwargs):
    arch = dict(TINY)
    arch.update(kwargs.pop('arch', {}))
    kwargs.setdefault('img_size', 64)
    return Vim(arch, **kwargs)


def conv_ref(x, weight, bias):
    """Depthwise causal conv1d (the released ``padding=k-1`` cut to L)."""
    k = weight.shape[-1]
    windows = F.pad(x, (k - 1, 0)).unfold(-1, k, 1)  # (B, E, L, k)
    return torch.einsum('bdlk,dk->bdl', windows, weight[:, 0]) + bias[:, None]


def perturb(model, scale=0.1):
    """Move every parameter off its (often symmetric) initial value."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


# --------------------------------------------------------------------------
# Construction.
# --------------------------------------------------------------------------
def test_arch_zoo():
    for short, long, dims in (
        ('t', 'tiny', 192),
        ('s', 'small', 384),
        ('b', 'base', 768),
    ):
        assert Vim.arch_zoo[short] == Vim.arch_zoo[long]
        arch = Vim.arch_zoo[long]
        assert arch['embed_dims'] == dims
        assert (
            arch['num_layers'],
            arch['patch_size'],
            arch['stride'],
            arch['d_state'],
            arch['expand'],
            arch['d_conv'],
            arch['cls_token'],
        ) == (24, 16, 16, 16, 2, 4, 'middle')


def test_arch_errors():
    with pytest.raises(ValueError, match='huge'):
        Vim('huge')
    arch = dict(TINY)
    del arch['d_conv']
    with pytest.raises(ValueError, match='d_conv'):
        Vim(arch)
    with pytest.raises(ValueError, match='out_indices'):
        tiny(out_indices=2)
    with pytest.raises(ValueError, match='out_indices'):
        tiny(out_indices=(0, -3))
    with pytest.raises(ValueError, match='out_type'):
        tiny(out_type='avg')
    with pytest.raises(ValueError, match='cls_token'):
        tiny(cls_token=None, out_type='cls_token')
    with pytest.raises(ValueError, match='cls_token'):
        tiny(cls_token='head')
    with pytest.raises(ValueError, match='frozen_stages'):
        tiny(frozen_stages=3)
    with pytest.raises(ValueError, match='norm_cfg'):
        tiny(norm_cfg=dict(type='BN'))


@pytest.mark.parametrize('arch,expected', [('tiny', 7.0), ('small', 25.8)])
def test_param_count(arch, expected):
    """The released sizes (7M / 26M, with a 1000-class head)."""
    model = Vim(arch)
    head = model.embed_dims * 1000 + 1000
    total = (sum(p.numel() for p in model.parameters()) + head) / 1e6
    assert abs(total - expected) / expected < 0.03, total


def test_official_names_and_init():
    model = tiny(arch=dict(num_layers=3))
    names = set(model.state_dict())
    mixer = {
        'in_proj.weight',
        'conv1d.weight',
        'conv1d.bias',
        'x_proj.weight',
        'dt_proj.weight',
        'dt_proj.bias',
        'A_log',
        'D',
        'conv1d_b.weight',
        'conv1d_b.bias',
        'x_proj_b.weight',
        'dt_proj_b.weight',
        'dt_proj_b.bias',
        'A_b_log',
        'D_b',
        'out_proj.weight',
    }
    expected = {
        'patch_embed.proj.weight',
        'patch_embed.proj.bias',
        'cls_token',
        'pos_embed',
        'norm_f.weight',
    }
    for i in range(3):
        expected.add(f'layers.{i}.norm.weight')
        expected |= {f'layers.{i}.mixer.{k}' for k in mixer}
    assert names == expected
    m = model.layers[0].mixer
    assert m.dt_rank == 2 and m.d_inner == 64
    assert tuple(m.x_proj.weight.shape) == (2 + 2 * 4, 64)
    logs = torch.log(torch.arange(1.0, 5.0)).expand(64, 4)
    torch.testing.assert_close(m.A_log.data, logs)
    torch.testing.assert_close(m.A_b_log.data, logs)
    assert bool((m.D == 1).all()) and bool((m.D_b == 1).all())
    dt = F.softplus(m.dt_proj.bias)
    assert bool((dt >= 1e-4 * 0.99).all()) and bool((dt <= 0.1 * 1.01).all())
    assert bool((m.dt_proj_b.bias == 0).all())  # zeroed, as released
    for p in (
        m.A_log,
        m.A_b_log,
        m.D,
        m.D_b,
        model.pos_embed,
        model.cls_token,
    ):
        assert getattr(p, '_no_weight_decay', False)


# --------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------
@pytest.mark.parametrize('cls_token', ['middle', None])
@pytest.mark.parametrize(
    'hw,grid', [((224, 224), (14, 14)), ((112, 137), (7, 9))]
)
def test_featmap_shapes(cls_token, hw, grid):
    model = tiny(img_size=224, cls_token=cls_token, out_indices=(0, -1))
    model.eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, *hw))
    assert len(outs) == 2
    for out in outs:
        assert out.shape == (2, 32, *grid)


def test_stride8():
    model = tiny(arch=dict(stride=8), img_size=64)
    assert model.patch_grid == (7, 7)
    assert model.pos_embed.shape == (1, 50, 32)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64))[0].shape == (1, 32, 7, 7)
        # padded to cover every pixel: ceil((70 - 16) / 8) + 1 = 8
        assert model(torch.randn(1, 3, 70, 64))[0].shape == (1, 32, 8, 7)
    assert Vim(dict(Vim.arch_zoo['t'], stride=8)).patch_grid == (27, 27)


def test_cls_token_in_the_middle():
    """Odd M = 3 * 5: the class token sits at M // 2 = 7, not 8."""
    model = perturb(tiny(img_size=(48, 80), final_norm=True))
    x = torch.randn(2, 3, 48, 80)
    tokens, grid, cls_index = model.embed(x)
    assert grid == (3, 5) and cls_index == 7 and tokens.shape[1] == 16
    torch.testing.assert_close(
        tokens[:, 7] - model.pos_embed[:, 7],
        model.cls_token[:, 0].expand(2, -1),
    )
    patches = model.patch_embed(x)[0] + torch.cat(
        [model.pos_embed[:, :7], model.pos_embed[:, 8:]], 1
    )
    torch.testing.assert_close(
        torch.cat([tokens[:, :7], tokens[:, 8:]], 1), patches
    )

    stream = {}
    model.layers[-1].register_forward_hook(
        lambda m, i, o: stream.update(x=o[0])
    )
    model.out_type = 'cls_token'
    with torch.no_grad():
        cls = model(x)
    assert len(cls) == 1 and cls[0].shape == (2, 32)
    torch.testing.assert_close(cls[0], model.norm_f(stream['x'])[:, 7])

    model.out_type = 'featmap'
    model.final_norm = False
    with torch.no_grad():
        fmap = model(x)[0]
    s = stream['x']
    expected = torch.cat([s[:, :7], s[:, 8:]], 1).transpose(1, 2)
    torch.testing.assert_close(fmap, expected.reshape(2, 32, 3, 5))


def test_out_indices_tap_the_stream():
    model = perturb(
        tiny(
            arch=dict(num_layers=4),
            cls_token=None,
            out_indices=(2, 0, -1),
            final_norm=False,
        )
    )
    streams = []
    for layer in model.layers:
        layer.register_forward_hook(lambda m, i, o: streams.append(o[0]))
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 48))
    assert len(outs) == 3
    for out, i in zip(outs, (0, 2, 3)):
        torch.testing.assert_close(
            out, streams[i].transpose(1, 2).reshape(1, 32, 4, 3)
        )


@pytest.mark.parametrize('out_type', ['featmap', 'cls_token'])
def test_all_params_get_gradients(out_type):
    model = tiny(out_type=out_type, drop_path_rate=0.1)
    model.train()
    outs = model(torch.randn(2, 3, 64, 64))
    sum(o.square().sum() for o in outs).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert bool(p.grad.abs().sum() > 0), name


def test_with_cp():
    model = perturb(tiny())
    model_cp = copy.deepcopy(model)
    model_cp.with_cp = True
    x = torch.randn(1, 3, 64, 64)
    outs = [m(x)[0] for m in (model, model_cp)]
    torch.testing.assert_close(outs[0], outs[1])
    for out in outs:
        out.sum().backward()
    for (n, p), p_cp in zip(model.named_parameters(), model_cp.parameters()):
        torch.testing.assert_close(p.grad, p_cp.grad, msg=n)


def test_frozen_stages():
    model = tiny(frozen_stages=1)
    model.train()
    frozen = [model.patch_embed, model.layers[0]]
    for m in frozen:
        assert not m.training
        assert all(not p.requires_grad for p in m.parameters())
    assert not model.pos_embed.requires_grad
    assert not model.cls_token.requires_grad
    assert model.layers[1].training
    assert all(p.requires_grad for p in model.layers[1].parameters())
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.1
    )
    model(torch.randn(1, 3, 64, 64))[0].sum().backward()
    opt.step()
    after = model.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        assert changed == (k.startswith('layers.1') or k == 'norm_f.weight'), k
    model = tiny(frozen_stages=2)
    assert not model.norm_f.weight.requires_grad


# --------------------------------------------------------------------------
# Position embeddings and loading.
# --------------------------------------------------------------------------
@pytest.mark.parametrize('cls_token', ['middle', None])
def test_pos_embed_resize_on_load(cls_token):
    small = perturb(tiny(img_size=32, cls_token=cls_token))  # 2 x 2 grid
    big = tiny(img_size=64, cls_token=cls_token)  # 4 x 4 grid
    big.load_state_dict(small.state_dict())
    pe = small.pos_embed
    if cls_token is None:
        expected = resize_pos_embed(pe, (2, 2), (4, 4))
    else:  # the class slot (at 4 // 2 = 2) is kept aside, re-inserted at 8
        grid = resize_pos_embed(
            torch.cat([pe[:, :2], pe[:, 3:]], 1), (2, 2), (4, 4)
        )
        expected = torch.cat([grid[:, :8], pe[:, 2:3], grid[:, 8:]], 1)
    torch.testing.assert_close(big.pos_embed.data, expected)
    # a forward at another size resizes the same way
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(small(x)[0], big(x)[0])


def test_class_slot_dropped_on_load():
    with_cls = perturb(tiny(img_size=64))
    dense = tiny(img_size=64, cls_token=None)
    state = {
        k: v for k, v in with_cls.state_dict().items() if k != 'cls_token'
    }
    dense.load_state_dict(state)
    pe = with_cls.pos_embed
    torch.testing.assert_close(
        dense.pos_embed.data, torch.cat([pe[:, :8], pe[:, 9:]], 1)
    )


def test_init_from_checkpoint(tmp_path):
    src = perturb(tiny(img_size=32))
    path = tmp_path / 'ckpt.pth'
    torch.save(
        {
            'state_dict': {
                f'backbone.{k}': v for k, v in src.state_dict().items()
            }
        },
        path,
    )
    model = tiny(
        img_size=32,
        init_cfg=dict(
            type='Pretrained', checkpoint=str(path), prefix='backbone.'
        ),
    )
    model.init_weights()
    for k, v in src.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, msg=k)


# --------------------------------------------------------------------------
# The released computation, the scan implementations, the pruning interface.
# --------------------------------------------------------------------------
def _released_forward(sd, img, depth, d_state, dt_rank):
    """The released classifier written out literally: residual/hidden pairs
    as in its Block, a causal depthwise conv, mamba's reference scan.
    """

    def scan(u, delta, A, B, C, D, z, bias):
        delta = F.softplus(delta + bias[:, None])
        h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
        ys = []
        for i in range(u.shape[-1]):
            h = (
                torch.exp(delta[..., i, None] * A) * h
                + (delta[..., i] * u[..., i])[..., None] * B[:, None, :, i]
            )
            ys.append(torch.einsum('bdn,bn->bd', h, C[..., i]))
        return (torch.stack(ys, -1) + u * D[:, None]) * F.silu(z)

    def branch(xz, p, sfx, A):
        x, z = xz.chunk(2, 1)
        w = sd[f'{p}conv1d{sfx}.weight']
        x = F.silu(conv_ref(x, w, sd[f'{p}conv1d{sfx}.bias']))
        dbl = x.transpose(1, 2) @ sd[f'{p}x_proj{sfx}.weight'].t()
        dt, B, C = dbl.split([dt_rank, d_state, d_state], -1)
        delta = (dt @ sd[f'{p}dt_proj{sfx}.weight'].t()).transpose(1, 2)
        D = sd[f'{p}D' + sfx]
        return scan(
            x,
            delta,
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            D,
            z,
            sd[f'{p}dt_proj{sfx}.bias'],
        )

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    x = F.conv2d(
        img,
        sd['patch_embed.proj.weight'],
        sd['patch_embed.proj.bias'],
        stride=16,
    )
    x = x.flatten(2).transpose(1, 2)
    n, M, _ = x.shape
    x = (
        torch.cat(
            [
                x[:, : M // 2],
                sd['cls_token'].expand(n, -1, -1),
                x[:, M // 2 :],
            ],
            1,
        )
        + sd['pos_embed']
    )
    residual, hidden = None, x
    for i in range(depth):
        p = f'layers.{i}.mixer.'
        residual = hidden if residual is None else residual + hidden
        xz = (
            rms(residual, sd[f'layers.{i}.norm.weight'])
            @ sd[p + 'in_proj.weight'].t()
        ).transpose(1, 2)
        y = branch(xz, p, '', -torch.exp(sd[p + 'A_log']))
        y_b = branch(xz.flip(-1), p, '_b', -torch.exp(sd[p + 'A_b_log']))
        hidden = (
            (y + y_b.flip(-1)).transpose(1, 2)
            / 2
            @ sd[p + 'out_proj.weight'].t()
        )
    return rms(residual + hidden, sd['norm_f.weight'])[:, M // 2]


def test_matches_the_released_computation():
    model = perturb(
        tiny(
            arch=dict(num_layers=3, embed_dims=40, d_state=8),
            img_size=(48, 80),
            out_type='cls_token',
            scan_impl='ref',
        )
    ).double()
    x = torch.randn(2, 3, 48, 80, dtype=torch.float64)
    with torch.no_grad():
        ours = model(x)[0]
    ref = _released_forward(model.state_dict(), x, 3, 8, 3)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


@needs_ext
def test_scan_impl_ref_vs_cpu():
    models = {}
    for impl in ('ref', 'cpu'):
        torch.manual_seed(1)
        models[impl] = perturb(
            tiny(scan_impl=impl, out_indices=(0, 1))
        ).double()
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    outs = {impl: m(x) for impl, m in models.items()}
    for a, b in zip(outs['ref'], outs['cpu']):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for out in outs.values():
        sum(o.sum() for o in out).backward()
    for (n, p), q in zip(
        models['ref'].named_parameters(), models['cpu'].parameters()
    ):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9, msg=n)


def _mixer(impl='auto', dtype=torch.float64):
    return perturb(BiMambaV2(16, d_state=4, scan_impl=impl)).to(dtype)


def mix(mixer, x, **kwargs):
    """The mixer's output, without its SSM output."""
    return mixer(x, **kwargs)[0]


@pytest.mark.parametrize('impl', ['ref', pytest.param('cpu', marks=needs_ext)])
def test_mixer_all_positions_equal_dense(impl):
    mixer = _mixer(impl)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    dense = mix(mixer, x)
    pos = torch.arange(11)
    assert torch.equal(mix(mixer, x, positions=pos), dense)
    assert torch.equal(
        mix(mixer, x, positions=pos.expand(2, 11), seq_len=11), dense
    )
    assert torch.equal(mix(mixer, x, positions=pos, gap_mode='none'), dense)


def test_mixer_naive_is_the_compact_sequence():
    mixer = _mixer('ref')
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    pos = torch.tensor([[0, 2, 3, 6, 7, 10, 12], [1, 2, 4, 5, 8, 9, 11]])
    naive = mix(mixer, x, positions=pos, seq_len=13, gap_mode='none')
    torch.testing.assert_close(naive, mix(mixer, x), rtol=0, atol=0)
    aligned = mix(mixer, x, positions=pos, seq_len=13)
    assert not torch.allclose(aligned, naive)
    # a common shift of the positions (or a longer seq_len) changes nothing
    shifted = mix(mixer, x, positions=pos + 3, seq_len=20)
    torch.testing.assert_close(shifted, aligned, rtol=1e-12, atol=1e-12)


def _null_gap_reference(mixer, x, pos, L):
    """The aligned mixer with gap_mode='null' as a full-length computation:
    at pruned positions the conv input is 0, and u, B, C and the raw step
    are 0 (a zero-input token with delta = softplus(dt bias))."""
    n, K, _ = x.shape
    xz = mixer.in_proj(x).transpose(1, 2)
    full = xz.new_zeros(n, xz.shape[1], L)
    full.scatter_(2, pos[:, None].expand(-1, xz.shape[1], -1), xz)
    kept = torch.zeros(n, L, dtype=torch.bool)
    kept.scatter_(1, pos, True)

    def branch(xz, kept, conv, x_proj, dt_proj, A_log, D):
        x, z = xz.chunk(2, 1)
        x = F.silu(conv_ref(x, conv.weight, conv.bias))
        dt, B, C = x_proj(x.transpose(1, 2)).split([1, 4, 4], -1)
        dt = F.linear(dt, dt_proj.weight).transpose(1, 2)
        m = kept[:, None].to(x.dtype)
        x, dt = x * m, dt * m
        B, C = B.transpose(1, 2) * m, C.transpose(1, 2) * m
        return selective_scan_ref(
            x, dt, -torch.exp(A_log), B, C, D, z, dt_proj.bias, True
        )

    y = branch(
        full,
        kept,
        mixer.conv1d,
        mixer.x_proj,
        mixer.dt_proj,
        mixer.A_log,
        mixer.D,
    )
    y_b = branch(
        full.flip(-1),
        kept.flip(-1),
        mixer.conv1d_b,
        mixer.x_proj_b,
        mixer.dt_proj_b,
        mixer.A_b_log,
        mixer.D_b,
    )
    y = (y + y_b.flip(-1)).transpose(1, 2)
    y = torch.stack([y[i, pos[i]] for i in range(n)])
    return mixer.out_proj(y / 2)


def test_mixer_aligned_both_directions():
    mixer = _mixer('ref')
    assert mixer.dt_rank == 1
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    pos = torch.tensor([[1, 2, 5, 6, 9, 10], [0, 3, 4, 7, 8, 11]])
    ours = mix(mixer, x, positions=pos, seq_len=12, gap_mode='null')
    ref = _null_gap_reference(mixer, x, pos, 12)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    out, y = mixer(x, positions=pos, seq_len=12)
    assert y.shape == (2, 6, 32)
    torch.testing.assert_close(out, mixer.out_proj(y / 2))


# --------------------------------------------------------------------------
# Checkpoint conversion.
# --------------------------------------------------------------------------
TOOL = osp.join(
    osp.dirname(__file__),
    '..',
    '..',
    'tools',
    'model_converters',
    'vim2mmssm.py',
)


def official_checkpoint(img_size=(48, 80), num_classes=10):
    """A released-layout checkpoint of a tiny Vim, and its model."""
    model = perturb(tiny(img_size=img_size, out_type='cls_token'))
    state = dict(model.state_dict())
    state['head.weight'] = torch.randn(num_classes, 32)
    state['head.bias'] = torch.randn(num_classes)
    ckpt = {
        'model': state,
        'model_ema': {k: v + 1 for k, v in state.items()},
        'epoch': 299,
        'args': argparse.Namespace(model='vim_tiny', lr=5e-4),
    }
    return ckpt, model


def test_convert_classifier():
    ckpt, model = official_checkpoint()
    converted = convert_vim(ckpt, dense=False)
    assert set(converted) == {f'backbone.{k}' for k in model.state_dict()} | {
        'head.fc.weight',
        'head.fc.bias',
    }
    clf = build_classifier(
        dict(type='Vim', arch=TINY, img_size=(48, 80)), num_classes=10
    )
    clf.load_state_dict(converted, strict=True)
    clf.eval()
    model.eval()
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        logits = clf(x)
        expected = F.linear(
            model(x)[0],
            ckpt['model']['head.weight'],
            ckpt['model']['head.bias'],
        )
    torch.testing.assert_close(logits, expected)
    # the bare state dict converts the same; EMA copies are dropped
    bare = dict(ckpt['model'])
    bare.update({f'ema_{k}': v for k, v in list(bare.items())[:3]})
    assert convert_vim(bare, dense=False).keys() == converted.keys()


def test_convert_dense():
    ckpt, model = official_checkpoint()  # M = 15: class slot at 7
    converted = convert_vim(ckpt)
    pe = ckpt['model']['pos_embed']
    torch.testing.assert_close(
        converted['backbone.pos_embed'], torch.cat([pe[:, :7], pe[:, 8:]], 1)
    )
    assert not any(
        k.startswith(('backbone.cls_token', 'backbone.norm_f', 'head'))
        for k in converted
    )
    dense = tiny(img_size=(48, 80), cls_token=None, final_norm=False)
    state = {k[len('backbone.') :]: v for k, v in converted.items()}
    dense.load_state_dict(state, strict=True)
    # and into another size, through the backbone's pos_embed resize
    square = official_checkpoint(img_size=64)[0]  # 4 x 4 + class slot
    converted = convert_vim(square)
    assert converted['backbone.pos_embed'].shape == (1, 16, 32)
    bigger = tiny(img_size=96, cls_token=None, final_norm=False)
    bigger.load_state_dict(
        {k[len('backbone.') :]: v for k, v in converted.items()}, strict=True
    )
    assert bigger.pos_embed.shape == (1, 36, 32)


def test_convert_unmappable_keys():
    ckpt, _ = official_checkpoint()
    ckpt['model']['rope.freqs_cos'] = torch.zeros(1)
    ckpt['model']['layers.0.mixer.gamma'] = torch.zeros(1)
    with pytest.raises(KeyError, match='rope.freqs_cos') as info:
        convert_vim(ckpt)
    assert 'layers.0.mixer.gamma' in str(info.value)


def _load_tool():
    spec = importlib.util.spec_from_file_location('vim2mmssm', TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.parametrize('dense', [False, True])
def test_converter_tool(tmp_path, dense):
    tool = _load_tool()
    ckpt, _ = official_checkpoint()
    src, dst = tmp_path / 'vim_t.pth', tmp_path / 'out' / 'vim-t.pth'
    torch.save(ckpt, src)
    tool.main([str(src), str(dst)] + (['--dense'] if dense else []))
    out = torch.load(dst, weights_only=True)
    assert out['meta']['dense'] is dense
    assert out['meta']['source'] == 'vim_t.pth'
    expected = convert_vim(ckpt, dense=dense)
    assert out['state_dict'].keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(out['state_dict'][k], v), k
    assert sorted(p.name for p in dst.parent.iterdir()) == ['vim-t.pth']


def test_converter_tool_errors(tmp_path):
    tool = _load_tool()
    missing = tmp_path / 'missing.pth'
    with pytest.raises(SystemExit, match='missing.pth'):
        tool.main([str(missing), str(tmp_path / 'a.pth')])
    broken = tmp_path / 'broken.pth'
    broken.write_bytes(b'not a checkpoint')
    with pytest.raises(SystemExit, match='broken.pth'):
        tool.main([str(broken), str(tmp_path / 'a.pth')])
    other = tmp_path / 'other.pth'
    torch.save({'model': {'encoder.weight': torch.zeros(1)}}, other)
    with pytest.raises(SystemExit, match='other.pth.*encoder.weight'):
        tool.main([str(other), str(tmp_path / 'a.pth')])
    assert not (tmp_path / 'a.pth').exists()
