"""The two builds of the compiled kernels (generic x86-64 and AVX2 + FMA,
setup.py) against the references, and the choice between them at load time
(mmssm/ops/ext.py)."""

import importlib
import os
import subprocess
import sys

import pytest
import torch

from mmssm.ops import causal_conv1d, selective_scan
from mmssm.ops.selective_scan import SCAN_CHUNK
from mmssm.testing import (
    assert_close_rel,
    in_ci,
    needs_ext,
    output_and_grads,
    random_positions,
)

ext_module = importlib.import_module('mmssm.ops.ext')
_NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')


def _build_or_skip(isa):
    if isa == 'avx2' and not ext_module.cpu_has_avx2():
        pytest.skip('this CPU has no AVX2')
    try:
        return ext_module.import_isa(isa)
    except (ImportError, OSError) as e:
        if in_ci():
            raise
        pytest.skip(f'the {isa} build is not there ({e})')


@pytest.fixture(params=['generic', 'avx2'])
def isa(request, monkeypatch):
    """Runs the test on one build (the ops load it through ``_ext``)."""
    monkeypatch.setattr(ext_module, '_ext', _build_or_skip(request.param))
    return request.param


def _scan_inputs(batch, dim, K, N, dtype, tokens_major):
    def bdk():
        t = torch.randn(batch, dim, K, dtype=dtype)
        return (
            t.transpose(1, 2).contiguous().transpose(1, 2)
            if (tokens_major)
            else t
        )

    proj = torch.randn(batch, K, 3 + 2 * N, dtype=dtype)
    inputs = dict(
        u=bdk(),
        delta=0.5 * bdk(),
        A=-torch.rand(dim, N, dtype=dtype) - 0.2,
        B=proj[..., 3 : 3 + N].transpose(1, 2),
        C=proj[..., 3 + N :].transpose(1, 2),
        D=torch.randn(dim, dtype=dtype),
        z=bdk(),
        delta_bias=torch.randn(dim, dtype=dtype),
    )
    return {k: v.requires_grad_() for k, v in inputs.items()}


# dim 11: a partial tile of channels in both builds; K 150: three chunks
# of the kernel's 64 steps, so the state and the 'prev' gaps cross chunks.
@needs_ext
@pytest.mark.parametrize(
    'dtype,rtol', [(torch.float64, 1e-10), (torch.float32, 2e-5)]
)
@pytest.mark.parametrize('tokens_major', [False, True])
@pytest.mark.parametrize('mode', ['forward', 'reverse', 'order'])
def test_scan_build_against_reference(isa, dtype, rtol, tokens_major, mode):
    batch, dim, K, L, N = 2, 11, 150, 260, 16
    inputs = _scan_inputs(batch, dim, K, N, dtype, tokens_major)
    kwargs = dict(delta_softplus=True, positions=random_positions(2, K, L))
    if mode == 'reverse':
        kwargs['reverse'] = True
    elif mode == 'order':
        kwargs['order'] = torch.stack([torch.randperm(K) for _ in range(2)])
    for gap_mode in ('prev', 'null', 'none'):
        y, g = output_and_grads(
            selective_scan, inputs, impl='cpu', gap_mode=gap_mode, **kwargs
        )
        y_ref, g_ref = output_and_grads(
            selective_scan, inputs, impl='ref', gap_mode=gap_mode, **kwargs
        )
        assert_close_rel(y, y_ref, rtol)
        for a, b in zip(g, g_ref):
            assert_close_rel(a, b, rtol)


@needs_ext
def test_scan_build_other_state_sizes(isa):
    """N = 5 (not a multiple of the lanes) runs the kernel's general-N
    loops."""
    inputs = _scan_inputs(1, 6, 70, 5, torch.float64, True)
    kwargs = dict(delta_softplus=True, positions=random_positions(1, 70, 99))
    y, g = output_and_grads(selective_scan, inputs, impl='cpu', **kwargs)
    y_ref, g_ref = output_and_grads(
        selective_scan, inputs, impl='ref', **kwargs
    )
    assert_close_rel(y, y_ref, 1e-10)
    for a, b in zip(g, g_ref):
        assert_close_rel(a, b, 1e-10)


@needs_ext
def test_build_exports_the_checkpoint_chunk(isa):
    assert ext_module.load_ext().scan_chunk == SCAN_CHUNK


def _kernel_backward_both_ways(inputs, **kwargs):
    """The compiled backward from the forward's checkpoints (what autograd
    runs) and from its own checkpoint pass (checkpoints=None), for the
    same output gradient (output_and_grads' random projection)."""
    y, g = output_and_grads(
        selective_scan, inputs, impl='cpu', delta_softplus=True, **kwargs
    )
    dout = torch.randn(
        y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype
    )
    own = torch.ops.mmssm.selective_scan_backward(
        dout,
        *(inputs[k].detach() for k in _NAMES),
        True,
        kwargs['positions'],
        kwargs['gap_mode'],
        kwargs.get('reverse', False),
        kwargs.get('order'),
        None,
    )
    return g, own


# K 150: three chunks, so the checkpoints of chunks 1 and 2 are used
@needs_ext
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('mode', ['forward', 'reverse', 'order'])
def test_forward_checkpoints_equal_the_backwards_own(isa, dtype, mode):
    """The backward from the forward's chunk checkpoints gives bit for bit
    the gradients of the backward that recomputes them (both against the
    reference: test_scan_build_against_reference)."""
    inputs = _scan_inputs(2, 11, 150, 16, dtype, True)
    kwargs = dict(positions=random_positions(2, 150, 260))
    if mode == 'reverse':
        kwargs['reverse'] = True
    elif mode == 'order':
        kwargs['order'] = torch.stack([torch.randperm(150) for _ in range(2)])
    for gap_mode in ('prev', 'null', 'none'):
        g, own = _kernel_backward_both_ways(
            inputs, gap_mode=gap_mode, **kwargs
        )
        assert len(g) == len(own)
        for a, b in zip(g, own):
            assert torch.equal(a, b)


@needs_ext
def test_forward_checkpoints_gradcheck(isa):
    """float64 gradcheck of the kernel's backward from the forward's
    checkpoints (3 chunks, 'prev' gaps across them)."""
    inputs = _scan_inputs(1, 3, 130, 2, torch.float64, True)
    positions = random_positions(1, 130, 200)
    names = list(inputs)

    def fn(*tensors):
        return selective_scan(
            **dict(zip(names, tensors)),
            delta_softplus=True,
            positions=positions,
            impl='cpu',
        )

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()))


class _SpyExt:
    """The loaded build, recording the forward's ``checkpoints`` flags."""

    def __init__(self, module):
        self.module, self.flags = module, []

    def __getattr__(self, name):
        return getattr(self.module, name)

    def selective_scan_fwd(self, *args):
        self.flags.append(args[-1])
        return self.module.selective_scan_fwd(*args)


@needs_ext
def test_checkpoints_only_when_a_backward_follows(isa, monkeypatch):
    spy = _SpyExt(ext_module._ext)
    monkeypatch.setattr(ext_module, '_ext', spy)
    inputs = _scan_inputs(1, 4, 70, 3, torch.float32, False)
    plain = {k: v.detach() for k, v in inputs.items()}
    with torch.no_grad():
        selective_scan(**inputs, impl='cpu')
    selective_scan(**plain, impl='cpu')
    y = selective_scan(**inputs, impl='cpu')
    assert spy.flags == [False, False, True]
    _, ckpt = torch.ops.mmssm.selective_scan(
        *(inputs[k] for k in _NAMES),
        False,
        None,
        'prev',
        'cpu',
        checkpoints=True,
    )
    assert ckpt.shape == (1, 4, 2, 3) and ckpt.dtype == torch.float32
    assert not ckpt[:, :, 0].any()  # the state before the first chunk
    assert ckpt[:, :, 1].abs().sum() > 0
    y.sum().backward()


def _kernel_decays(x, delta_step=1.0):
    """exp(x) as the float32 kernel computes a decay: a 2-step scan per
    channel (N 1, B = C = u_0 = 1, u_1 = 0), whose second output is
    exp(delta_1 A) h_0 with h_0 = 1; A = x, delta_1 = 1."""
    dim = x.numel()
    u = torch.zeros(1, dim, 2)
    u[..., 0] = 1.0
    delta = torch.full((1, dim, 2), delta_step)
    ones = torch.ones(1, 1, 2)
    with torch.no_grad():
        y = selective_scan(
            u, delta, x.float().view(dim, 1), ones, ones, impl='cpu'
        )
    return y[0, :, 1]


def _rel_err(y, x):
    ref = torch.exp(x.double())
    return ((y.double() - ref).abs() / ref).max().item()


@needs_ext
def test_float32_decay_exp_accuracy(isa):
    """The recurrence's float32 exp (2^n 2^f, degree-5 polynomial, A
    pre-scaled by log2(e); kernels/common/simd.h) against float64 exp of
    the same float32 arguments, over the decays' range: within 6e-7
    relative for |x| <= 1, within 6e-7 + 7e-8 |x| down to -87 (the
    rounding of A log2(e) to float32: exp of a float32 argument is
    conditioned by |x|), exactly 1 at 0."""
    x = -torch.linspace(0, 1, 200_001)
    assert _rel_err(_kernel_decays(x), x) < 6e-7
    x = -torch.linspace(0, 87, 200_001)
    y = _kernel_decays(x)
    ref = torch.exp(x.double())
    rel = (y.double() - ref).abs() / ref
    assert (rel < 6e-7 + 7e-8 * x.double().abs()).all(), rel.max()
    assert y[0].item() == 1.0
    x = torch.linspace(0, 87, 20_001)  # growth (A > 0) is computed too
    assert _rel_err(_kernel_decays(x), x) < 6e-7 + 7e-8 * 87


@needs_ext
def test_float32_decay_exp_out_of_range(isa):
    """Chunks with an exponent past the unclamped exp's range take the
    clamped one, which agrees bit for bit in range: the same exponents
    with and without an out-of-range channel in their tile (8 channels,
    so in both builds' tiles); below 2^-126.5 gives 0, above 2^127.5
    2^127.5, NaN stays NaN."""
    x = -torch.rand(7 * 50) * 80
    plain = _kernel_decays(x)
    for outlier, expected in (
        (-300.0, 0.0),
        (-87.9, 0.0),
        (300.0, 2.0**127.5),
        (float('nan'), float('nan')),
    ):
        mixed = torch.cat(
            [x.view(50, 7), torch.full((50, 1), outlier)], dim=1
        ).flatten()
        y = _kernel_decays(mixed).view(50, 8)
        assert torch.equal(y[:, :7].flatten(), plain)
        torch.testing.assert_close(
            y[:, 7], torch.full((50,), expected), equal_nan=True
        )
    # an exponent in range only by its delta: checked per step, not per A
    big_delta = _kernel_decays(torch.full((8,), -1.0), delta_step=300.0)
    assert torch.equal(big_delta, torch.zeros(8))


@needs_ext
def test_float32_softplus_and_gate_accuracy(isa):
    """The prepare pass's float32 softplus and silu (vexp, vlog_1to2):
    one step with u = B = C = 1 outputs softplus(delta), or silu(z)."""
    raw = torch.linspace(-20, 20, 40_001)
    dim = raw.numel()
    ones = torch.ones(1, 1, 1)
    u = torch.ones(1, dim, 1)
    A = -torch.ones(dim, 1)
    with torch.no_grad():
        sp = selective_scan(
            u,
            raw.view(1, dim, 1),
            A,
            ones,
            ones,
            delta_softplus=True,
            impl='cpu',
        ).flatten()
        gated = selective_scan(
            u,
            torch.ones(1, dim, 1),
            A,
            ones,
            ones,
            z=raw.view(1, dim, 1),
            impl='cpu',
        ).flatten()
    # absolute near 0: log(1 + exp(-|x|)) rounds 1 + exp(-|x|) first
    ref = torch.nn.functional.softplus(raw.double())
    assert ((sp.double() - ref).abs() < 3e-7 + 2e-6 * ref).all()
    ref = torch.nn.functional.silu(raw.double())
    assert ((gated.double() - ref).abs() < 3e-7 + 2e-6 * ref.abs()).all()


@needs_ext
@pytest.mark.parametrize('reverse', [False, True])
def test_conv_build_against_reference(isa, reverse):
    x = torch.randn(2, 11, 90, dtype=torch.float64)
    inputs = dict(
        x=x.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(),
        weight=torch.randn(11, 4, dtype=torch.float64, requires_grad=True),
        bias=torch.randn(11, dtype=torch.float64, requires_grad=True),
    )
    kwargs = dict(
        positions=random_positions(2, 90, 150),
        activation='silu',
        reverse=reverse,
    )
    y, g = output_and_grads(causal_conv1d, inputs, impl='cpu', **kwargs)
    y_ref, g_ref = output_and_grads(
        causal_conv1d, inputs, impl='ref', **kwargs
    )
    assert_close_rel(y, y_ref, 1e-10)
    for a, b in zip(g, g_ref):
        assert_close_rel(a, b, 1e-10)


def _loaded_isa(env):
    code = 'import mmssm.ops.ext as e\ne.load_ext()\nprint(e.loaded_isa())\n'
    out = subprocess.run(
        [sys.executable, '-c', code],
        capture_output=True,
        text=True,
        env=dict(os.environ, **env),
    )
    return out


@needs_ext
def test_dispatch_picks_the_cpus_build():
    """Unset, the AVX2 build on an AVX2 CPU; MMSSM_KERNEL_ISA=generic
    forces the generic one."""
    env = {k: v for k, v in os.environ.items() if k != 'MMSSM_KERNEL_ISA'}
    auto = subprocess.run(
        [
            sys.executable,
            '-c',
            'import mmssm.ops.ext as e; e.load_ext(); print(e.loaded_isa())',
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert auto.returncode == 0, auto.stderr
    expected = 'avx2' if ext_module.cpu_has_avx2() else 'generic'
    assert auto.stdout.strip() == expected
    forced = _loaded_isa({'MMSSM_KERNEL_ISA': 'generic'})
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.strip() == 'generic'


def test_dispatch_refuses_an_unknown_isa():
    out = _loaded_isa({'MMSSM_KERNEL_ISA': 'sse9'})
    assert out.returncode != 0
    assert "MMSSM_KERNEL_ISA must be one of ('generic', 'avx2')" in (
        out.stderr
    )


@needs_ext
def test_missing_avx2_build_falls_back_with_a_warning(monkeypatch):
    """An old build without ``mmssm._ext_avx2`` on an AVX2 CPU: the generic
    build, with a warning; forced with MMSSM_KERNEL_ISA=avx2, no fallback."""
    real = ext_module.import_isa

    def no_avx2(isa):
        if isa == 'avx2':
            raise ImportError('No module named mmssm._ext_avx2')
        return real(isa)

    monkeypatch.setattr(ext_module, 'import_isa', no_avx2)
    monkeypatch.setattr(ext_module, 'cpu_has_avx2', lambda: True)
    monkeypatch.setattr(ext_module, '_warned', set())
    monkeypatch.setattr(ext_module, '_isa', ext_module._isa)
    monkeypatch.setattr(ext_module, '_error', ext_module._error)
    monkeypatch.delenv('MMSSM_KERNEL_ISA', raising=False)
    monkeypatch.setattr(ext_module, '_ext', ext_module._NOT_LOADED)
    with pytest.warns(UserWarning, match='using the generic build'):
        assert ext_module.load_ext() is real('generic')
    assert ext_module.loaded_isa() == 'generic'
    monkeypatch.setenv('MMSSM_KERNEL_ISA', 'avx2')
    monkeypatch.setattr(ext_module, '_ext', ext_module._NOT_LOADED)
    assert ext_module.load_ext() is None
    assert 'mmssm._ext_avx2' in ext_module.ext_status()


def _low_rank_inputs(batch, dim, K, N, R, dtype, tokens_major):
    """_scan_inputs with delta the low-rank (batch, R, K) input of
    delta_proj (dim, R): a slice of the (batch, K, R + 2N) projection that
    B and C come from (tokens-major), or contiguous."""
    inputs = {
        k: v.detach()
        for k, v in _scan_inputs(batch, dim, K, N, dtype, tokens_major).items()
    }
    x_dbl = torch.randn(batch, K, R + 2 * N, dtype=dtype)
    low = 0.7 * x_dbl[..., :R].transpose(1, 2)
    inputs['delta'] = low if tokens_major else low.contiguous()
    inputs['delta_proj'] = torch.randn(dim, R, dtype=dtype) * R**-0.5
    return {k: v.requires_grad_() for k, v in inputs.items()}


def _unfused(delta, delta_proj, **kwargs):
    delta = torch.einsum('er,brk->bek', delta_proj, delta)
    return selective_scan(delta=delta, **kwargs)


# dim 11: a partial tile in both builds; K 150: three chunks (the 'prev'
# gap of a chunk's first step recomputed from the low-rank rows in the
# backward); R 24: Vim's dt_rank (three blocks of 8 steps' FMAs).
@needs_ext
@pytest.mark.parametrize(
    'dtype,rtol', [(torch.float64, 1e-10), (torch.float32, 2e-5)]
)
@pytest.mark.parametrize('tokens_major', [False, True])
@pytest.mark.parametrize('mode', ['forward', 'reverse', 'order'])
def test_fused_delta_proj_build_against_reference(
    isa, dtype, rtol, tokens_major, mode
):
    """The kernel's fused projection (delta_proj) against the reference
    on the projected step sizes: output and all gradients, dense and
    every gap mode."""
    batch, dim, K, L, N, R = 2, 11, 150, 260, 16, 24
    inputs = _low_rank_inputs(batch, dim, K, N, R, dtype, tokens_major)
    kwargs = dict(delta_softplus=True)
    if mode == 'reverse':
        kwargs['reverse'] = True
    elif mode == 'order':
        kwargs['order'] = torch.stack([torch.randperm(K) for _ in range(2)])
    runs = [dict(kwargs)]
    positions = random_positions(batch, K, L)
    for gap_mode in ('prev', 'null', 'none'):
        runs.append(dict(kwargs, positions=positions, gap_mode=gap_mode))
    for kw in runs:
        y, g = output_and_grads(selective_scan, inputs, impl='cpu', **kw)
        y_ref, g_ref = output_and_grads(_unfused, inputs, impl='ref', **kw)
        assert_close_rel(y, y_ref, rtol)
        assert len(g) == len(g_ref) == len(inputs)
        for a, b in zip(g, g_ref):
            assert_close_rel(a, b, rtol)


@needs_ext
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_fused_delta_proj_checkpoints(isa, dtype):
    """With delta_proj, the backward from the forward's checkpoints gives
    bit for bit the gradients of the backward that recomputes them."""
    inputs = _low_rank_inputs(2, 11, 150, 16, 24, dtype, True)
    kwargs = dict(positions=random_positions(2, 150, 260), gap_mode='prev')
    y, g = output_and_grads(
        selective_scan, inputs, impl='cpu', delta_softplus=True, **kwargs
    )
    dout = torch.randn(
        y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype
    )
    tensors = [inputs[k].detach() for k in _NAMES]
    own = torch.ops.mmssm.selective_scan_backward(
        dout,
        *tensors,
        True,
        kwargs['positions'],
        'prev',
        False,
        None,
        None,
        inputs['delta_proj'].detach(),
    )
    # own[1]: the gradient of the full step sizes; project it as the op
    d_full = own[1]
    assert d_full.shape == (2, 11, 150) and d_full.stride(1) == 1
    d_low = torch.einsum('er,bek->brk', inputs['delta_proj'], d_full)
    d_proj = torch.einsum('bek,brk->er', d_full, inputs['delta'])
    assert_close_rel(g[1], d_low, 1e-10 if dtype == torch.float64 else 1e-5)
    assert_close_rel(g[-1], d_proj, 1e-10 if dtype == torch.float64 else 1e-5)
    for a, b in zip([g[0], *g[2:-1]], [own[0], *own[2:]]):
        assert torch.equal(a, b)
