import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F

from mmssm.ops import (
    align_to_dense,
    masked_delta,
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
)
from mmssm.testing import (
    assert_close_rel,
    needs_ext,
    output_and_grads,
    random_positions,
)

ext_module = importlib.import_module('mmssm.ops.ext')

NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')


def make_inputs(
    batch,
    dim,
    K,
    N,
    dtype=torch.float64,
    with_D=True,
    with_z=True,
    with_bias=True,
):
    inputs = dict(
        u=torch.randn(batch, dim, K, dtype=dtype),
        delta=0.5 * torch.randn(batch, dim, K, dtype=dtype),
        A=-torch.rand(dim, N, dtype=dtype) - 0.2,
        B=torch.randn(batch, N, K, dtype=dtype),
        C=torch.randn(batch, N, K, dtype=dtype),
        D=torch.randn(dim, dtype=dtype) if with_D else None,
        z=torch.randn(batch, dim, K, dtype=dtype) if with_z else None,
        delta_bias=torch.randn(dim, dtype=dtype) if with_bias else None,
    )
    for t in inputs.values():
        if t is not None:
            t.requires_grad_()
    return inputs


def run(impl, inputs, **kwargs):
    """Output and the gradients of a fixed random projection of it."""
    return output_and_grads(selective_scan, inputs, impl=impl, **kwargs)


def compare(impl, inputs, rtol, **kwargs):
    y_ref, g_ref = run('ref', inputs, **kwargs)
    y, g = run(impl, inputs, **kwargs)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert_close_rel(y, y_ref, rtol)
    assert len(g) == len(g_ref)
    for a, b in zip(g, g_ref):
        assert a.shape == b.shape
        assert_close_rel(a, b, rtol)


# ---------------------------------------------------------------------------
# The identities of the alignment, on the reference: with every token kept
# the aligned scan is the dense scan; 'null' is the dense full-length scan
# with zero input, zero B and C and delta = softplus(delta_bias) at the
# pruned positions; 'prev' is the dense full-length scan in which each
# pruned position takes the delta of the previous kept one (B u = 0 there);
# both read at the kept positions.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    'impl', ['ref', 'chunked', pytest.param('cpu', marks=needs_ext)]
)
@pytest.mark.parametrize('gap_mode', ['prev', 'null', 'none'])
def test_all_kept_equals_dense(impl, gap_mode):
    inputs = make_inputs(2, 5, 13, 4)
    dense = selective_scan(**inputs, delta_softplus=True, impl=impl)
    kept = selective_scan(
        **inputs,
        delta_softplus=True,
        impl=impl,
        positions=torch.arange(13),
        gap_mode=gap_mode,
    )
    torch.testing.assert_close(kept, dense, rtol=0, atol=0)


def _full_length(kept, positions, L, fill):
    """Scatter (batch, C, K) kept values to (batch, C, L); ``fill`` else."""
    full = (
        fill.clone()
        if torch.is_tensor(fill)
        else kept.new_full((*kept.shape[:2], L), fill)
    )
    index = positions[:, None, :].expand(-1, kept.shape[1], -1)
    return full.scatter(2, index, kept)


def _read_kept(full, positions):
    index = positions[:, None, :].expand(-1, full.shape[1], -1)
    return full.gather(2, index)


@pytest.mark.parametrize('with_bias', [True, False])
def test_null_equals_masked_dense_scan(with_bias):
    batch, dim, K, L, N = 2, 3, 9, 23, 4
    inputs = make_inputs(batch, dim, K, N, with_bias=with_bias)
    pos = random_positions(batch, K, L)
    aligned = selective_scan_ref(
        **inputs, delta_softplus=True, positions=pos, gap_mode='null'
    )
    # pruned positions: zero input, zero B and C, delta = softplus(bias)
    full = dict(inputs)
    full['u'] = _full_length(inputs['u'], pos, L, 0.0)
    full['delta'] = _full_length(inputs['delta'], pos, L, 0.0)
    full['z'] = _full_length(inputs['z'], pos, L, 0.0)
    full['B'] = _full_length(inputs['B'], pos, L, 0.0)
    full['C'] = _full_length(inputs['C'], pos, L, 0.0)
    dense = selective_scan_ref(**full, delta_softplus=True)
    torch.testing.assert_close(aligned, _read_kept(dense, pos))


def test_prev_equals_dense_scan_with_previous_delta():
    batch, dim, K, L, N = 2, 3, 9, 23, 4
    inputs = make_inputs(batch, dim, K, N)
    pos = random_positions(batch, K, L)
    aligned = selective_scan_ref(
        **inputs, delta_softplus=True, positions=pos, gap_mode='prev'
    )
    # The dense scan gets softplus'd deltas; a pruned position takes the
    # delta of the previous kept position, with B u = 0 and C = 0 there.
    delta = F.softplus(inputs['delta'] + inputs['delta_bias'][:, None])
    owner = (
        torch.searchsorted(pos, torch.arange(L).repeat(batch, 1), right=True)
        - 1
    )  # previous kept index
    owner = owner.clamp_min(0)[:, None, :].expand(-1, dim, -1)
    full = dict(inputs, delta_bias=None)
    full['delta'] = delta.gather(2, owner)
    full['u'] = _full_length(inputs['u'], pos, L, 0.0)
    full['z'] = _full_length(inputs['z'], pos, L, 0.0)
    full['B'] = _full_length(inputs['B'], pos, L, 0.0)
    full['C'] = _full_length(inputs['C'], pos, L, 0.0)
    dense = selective_scan_ref(**full, delta_softplus=False)
    torch.testing.assert_close(aligned, _read_kept(dense, pos))


@pytest.mark.parametrize('gap_mode', ['prev', 'null', 'none'])
def test_masked_delta_scan_equals_aligned(gap_mode):
    """The masked mode (DyVM): a full-length scan with zero u, B, C at the
    masked steps and their steps from masked_delta equals the aligned scan
    of the kept steps (the compact one for 'none'), at the kept steps."""
    batch, dim, K, L, N = 2, 3, 9, 23, 4
    inputs = make_inputs(batch, dim, K, N)
    pos = random_positions(batch, K, L)
    aligned = selective_scan_ref(
        **inputs, delta_softplus=True, positions=pos, gap_mode=gap_mode
    )
    mask = _full_length(torch.ones(batch, 1, K), pos, L, 0.0)[:, 0]
    full = {
        k: _full_length(v, pos, L, 0.0)
        if k in ('u', 'delta', 'z', 'B', 'C')
        else v
        for k, v in inputs.items()
    }
    full['delta'] = masked_delta(
        full['delta'], mask, gap_mode, inputs['delta_bias'], True
    )
    dense = selective_scan_ref(**dict(full, delta_bias=None))
    torch.testing.assert_close(aligned, _read_kept(dense, pos))
    with pytest.raises(ValueError, match='gap_mode'):
        masked_delta(full['delta'], mask, 'zero')


@pytest.mark.parametrize('gap_mode', ['prev', 'null'])
def test_reparametrisation_equals_direct_recurrence(gap_mode):
    batch, dim, K, L, N = 2, 4, 11, 30, 5
    inputs = make_inputs(batch, dim, K, N)
    pos = random_positions(batch, K, L)
    direct = selective_scan_ref(
        **inputs, delta_softplus=True, positions=pos, gap_mode=gap_mode
    )
    u_eff, delta_eff = align_to_dense(
        inputs['u'], inputs['delta'], inputs['delta_bias'], True, pos, gap_mode
    )
    y = selective_scan_ref(
        u_eff, delta_eff, inputs['A'], inputs['B'], inputs['C']
    )
    y = (y + inputs['u'] * inputs['D'][:, None]) * F.silu(inputs['z'])
    torch.testing.assert_close(y, direct)


def test_none_is_the_compact_scan():
    inputs = make_inputs(2, 3, 8, 4)
    pos = random_positions(2, 8, 20)
    naive = selective_scan_ref(**inputs, positions=pos, gap_mode='none')
    torch.testing.assert_close(naive, selective_scan_ref(**inputs))


def test_gaps_decay_the_state():
    """A longer gap forgets more: the output moves towards D u."""
    inputs = make_inputs(1, 2, 2, 3, with_z=False)
    near = selective_scan_ref(
        **inputs, delta_softplus=True, positions=torch.tensor([0, 1])
    )
    far = selective_scan_ref(
        **inputs, delta_softplus=True, positions=torch.tensor([0, 500])
    )
    second = {
        k: v[..., 1:] if k in ('u', 'delta', 'B', 'C') else v
        for k, v in inputs.items()
    }
    alone = selective_scan_ref(**second, delta_softplus=True)
    torch.testing.assert_close(near[..., 0], far[..., 0])
    assert not torch.allclose(near[..., 1], far[..., 1])
    torch.testing.assert_close(far[..., 1], alone[..., 0])


# ---------------------------------------------------------------------------
# Kernel and chunked scan against the reference.
# ---------------------------------------------------------------------------
SHAPES = [  # batch, dim, K, L (original length), N
    (1, 1, 1, 1, 16),
    (1, 3, 1, 7, 16),
    (2, 5, 17, 40, 16),
    (3, 7, 33, 33, 5),
    (2, 4, 64, 200, 16),
]


@pytest.mark.parametrize(
    'impl', [pytest.param('cpu', marks=needs_ext), 'chunked']
)
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('gap_mode', ['prev', 'null', 'none'])
@pytest.mark.parametrize(
    'dtype,rtol', [(torch.float64, 1e-10), (torch.float32, 2e-5)]
)
def test_against_reference(impl, shape, gap_mode, dtype, rtol):
    batch, dim, K, L, N = shape
    inputs = make_inputs(batch, dim, K, N, dtype=dtype)
    pos = random_positions(batch, K, L)
    compare(
        impl,
        inputs,
        rtol,
        delta_softplus=True,
        positions=pos,
        gap_mode=gap_mode,
    )


@pytest.mark.parametrize(
    'impl', [pytest.param('cpu', marks=needs_ext), 'chunked']
)
@pytest.mark.parametrize(
    'with_D,with_z,with_bias,softplus',
    [
        (False, False, False, False),
        (True, False, True, False),
        (False, True, False, True),
    ],
)
def test_optional_arguments(impl, with_D, with_z, with_bias, softplus):
    inputs = make_inputs(
        2, 6, 21, 16, with_D=with_D, with_z=with_z, with_bias=with_bias
    )
    if not softplus:  # keep the step sizes positive
        inputs['delta'] = (
            inputs['delta'].detach().abs() + 0.1
        ).requires_grad_()
    for gap_mode in ('prev', 'null'):
        compare(
            impl,
            inputs,
            1e-10,
            delta_softplus=softplus,
            positions=random_positions(2, 21, 50),
            gap_mode=gap_mode,
        )


@needs_ext
@pytest.mark.parametrize('threads', [2, 3])
def test_threads(threads):
    """Rows split over threads; dB and dC summed from per-thread parts."""
    inputs = make_inputs(3, 9, 40, 16, dtype=torch.float64)
    pos = random_positions(3, 40, 90)
    torch.set_num_threads(threads)
    compare('cpu', inputs, 1e-10, delta_softplus=True, positions=pos)


@needs_ext
def test_shared_positions_and_non_contiguous_inputs():
    batch, dim, K, N = 2, 6, 19, 16
    inputs = make_inputs(batch, dim, K, N)
    # the same values, laid out non-contiguously
    strided = dict(inputs)
    strided['u'] = (
        inputs['u']
        .detach()
        .transpose(1, 2)
        .contiguous()
        .transpose(1, 2)
        .requires_grad_()
    )
    strided['B'] = (
        inputs['B'].detach().repeat(1, 2, 1)[:, ::2].requires_grad_()
    )
    assert not strided['u'].is_contiguous()
    assert not strided['B'].is_contiguous()
    pos = random_positions(1, K, 45)[0]  # (K,): shared by the batch
    compare('cpu', strided, 1e-10, delta_softplus=True, positions=pos)


@needs_ext
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype):
    inputs = make_inputs(2, 4, 12, 16, dtype=torch.float32)
    half = {
        k: None if v is None else v.detach().to(dtype).requires_grad_()
        for k, v in inputs.items()
    }
    pos = random_positions(2, 12, 30)
    y, grads = run('cpu', half, delta_softplus=True, positions=pos)
    y_ref, _ = run('ref', half, delta_softplus=True, positions=pos)
    assert y.dtype == dtype
    assert all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(y, y_ref)


@pytest.mark.parametrize('impl', ['ref', pytest.param('cpu', marks=needs_ext)])
@pytest.mark.parametrize('gap_mode', ['prev', 'null'])
def test_gradcheck(impl, gap_mode):
    inputs = make_inputs(2, 2, 5, 3)
    pos = random_positions(2, 5, 12)
    names = [n for n in NAMES if inputs[n] is not None]

    def fn(*tensors):
        return selective_scan(
            **dict(zip(names, tensors)),
            delta_softplus=True,
            positions=pos,
            gap_mode=gap_mode,
            impl=impl,
        )

    assert torch.autograd.gradcheck(fn, [inputs[n] for n in names])


# ---------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------
def _call(**changes):
    inputs = make_inputs(2, 3, 6, 4)
    kwargs = dict(inputs, positions=torch.arange(0, 12, 2))
    kwargs.update(changes)
    return selective_scan(**kwargs, impl='ref')


@pytest.mark.parametrize(
    'changes,error,match',
    [
        (dict(B=torch.randn(2, 4, 5)), ValueError, 'B must have shape'),
        (
            dict(delta=torch.randn(2, 3, 7)),
            ValueError,
            'delta must have shape',
        ),
        (dict(A=torch.randn(4, 4)), ValueError, 'A must be'),
        (dict(u=torch.randn(3, 6)), ValueError, 'u must be'),
        (dict(D=torch.randn(2)), ValueError, 'D must have shape'),
        (
            dict(positions=torch.tensor([0, 1, 1, 2, 3, 4])),
            ValueError,
            'strictly increasing',
        ),
        (
            dict(positions=torch.tensor([-1, 1, 2, 3, 4, 5])),
            ValueError,
            'non-negative',
        ),
        (
            dict(positions=torch.arange(6, dtype=torch.int32)),
            TypeError,
            'positions must be int64',
        ),
        (dict(positions=torch.arange(5)), ValueError, 'positions must be'),
        (dict(positions=[0, 1, 2, 3, 4, 5]), TypeError, 'positions must be'),
        (
            dict(u=torch.randint(0, 3, (2, 3, 6))),
            TypeError,
            'u must be a floating',
        ),
        (
            dict(C=torch.randn(2, 4, 6, device='meta')),
            ValueError,
            'C is on meta',
        ),
        (
            dict(positions=torch.arange(6, device='meta')),
            ValueError,
            'positions is on meta',
        ),
        (dict(gap_mode='zero'), ValueError, 'gap_mode'),
    ],
)
def test_bad_input(changes, error, match):
    with pytest.raises(error, match=match):
        _call(**changes)


def test_bad_impl():
    inputs = make_inputs(1, 2, 3, 4)
    with pytest.raises(ValueError, match='impl'):
        selective_scan(**inputs, impl='gpu')


@pytest.mark.parametrize(
    'impl', ['ref', 'chunked', pytest.param('cpu', marks=needs_ext)]
)
def test_empty_sequence(impl):
    inputs = make_inputs(2, 3, 0, 4)
    y = selective_scan(
        **inputs, positions=torch.zeros(2, 0, dtype=torch.long), impl=impl
    )
    assert y.shape == (2, 3, 0)


@pytest.mark.parametrize(
    'impl', ['chunked', pytest.param('cpu', marks=needs_ext)]
)
def test_nan_input_propagates_without_crash(impl):
    inputs = make_inputs(1, 2, 8, 16, with_z=False)
    with torch.no_grad():
        inputs['delta'][0, 0, 3] = float('nan')
    y, grads = run(
        impl, inputs, delta_softplus=True, positions=torch.arange(0, 16, 2)
    )
    assert torch.isnan(y[0, 0, 3:]).all()
    assert torch.isfinite(y[0, 0, :3]).all()
    assert torch.isfinite(y[0, 1]).all()


def test_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(ext_module, '_ext', None)
    monkeypatch.setattr(ext_module, '_error', 'ImportError: test')
    monkeypatch.setattr(ext_module, '_warned', set())
    monkeypatch.delenv('MMSSM_SCAN_IMPL', raising=False)
    inputs = make_inputs(1, 2, 5, 3)
    with pytest.warns(UserWarning, match="missing.*'chunked'"):
        y = selective_scan(**inputs)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        selective_scan(**inputs)  # warned once only
    torch.testing.assert_close(y, selective_scan_chunked(**inputs))
    with pytest.raises(RuntimeError, match="impl='cpu'.*missing"):
        selective_scan(**inputs, impl='cpu')


def test_cuda_impl_refuses_cpu_tensors():
    inputs = make_inputs(1, 2, 5, 3)
    with pytest.raises(RuntimeError, match="impl='cuda'.*CUDA tensors"):
        selective_scan(**inputs, impl='cuda')


def test_env_var_chooses_impl(monkeypatch):
    inputs = make_inputs(1, 2, 5, 3)
    monkeypatch.setenv('MMSSM_SCAN_IMPL', 'ref')
    torch.testing.assert_close(
        selective_scan(**inputs), selective_scan_ref(**inputs), rtol=0, atol=0
    )
    monkeypatch.setenv('MMSSM_SCAN_IMPL', 'fast')
    with pytest.raises(ValueError, match='MMSSM_SCAN_IMPL'):
        selective_scan(**inputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_against_reference():
    pytest.importorskip('mamba_ssm')
    inputs = make_inputs(2, 8, 40, 16, dtype=torch.float32)
    pos = random_positions(2, 40, 90)
    ref = selective_scan_ref(**inputs, delta_softplus=True, positions=pos)
    cuda = {
        k: None if v is None else v.detach().cuda() for k, v in inputs.items()
    }
    y = selective_scan(
        **cuda, delta_softplus=True, positions=pos.cuda(), impl='cuda'
    )
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# Scan order (reverse, order) and layouts: the kernel reads them natively;
# the reference runs on flipped / gathered copies, and both equal the plain
# scan of explicitly flipped / gathered inputs.
# ---------------------------------------------------------------------------
def _flipped(inputs, pos):
    per_token = ('u', 'delta', 'B', 'C', 'z')
    flipped = {
        k: (v.flip(-1) if k in per_token else v) for k, v in inputs.items()
    }
    return flipped, pos[:, -1:] - pos.flip(-1)


@pytest.mark.parametrize('gap_mode', ['prev', 'null', 'none'])
def test_reverse_is_the_scan_of_the_flipped_sequence(gap_mode):
    inputs = make_inputs(2, 3, 9, 4)
    pos = random_positions(2, 9, 23)
    y = selective_scan_ref(
        **inputs,
        delta_softplus=True,
        positions=pos,
        gap_mode=gap_mode,
        reverse=True,
    )
    flipped, pos_f = _flipped(inputs, pos)
    expected = selective_scan_ref(
        **flipped, delta_softplus=True, positions=pos_f, gap_mode=gap_mode
    ).flip(-1)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    # the gap of a reversed scan is the one to the next token
    pos_b = torch.tensor([[0, 1, 5, 6, 7, 8, 9, 10, 11]]).expand(2, 9)
    y_gap = selective_scan_ref(
        **inputs, delta_softplus=True, positions=pos_b, reverse=True
    )
    y_dense = selective_scan_ref(**inputs, delta_softplus=True, reverse=True)
    assert torch.equal(y_gap[..., 2:], y_dense[..., 2:])
    assert not torch.allclose(y_gap[..., :2], y_dense[..., :2])


def test_order_is_the_scan_of_the_gathered_tokens():
    inputs = make_inputs(2, 3, 9, 4)
    order = torch.stack([torch.randperm(9), torch.randperm(9)])
    pos = random_positions(2, 9, 23)
    y = selective_scan_ref(
        **inputs, delta_softplus=True, positions=pos, order=order
    )
    index = order[:, None].expand(2, 3, 9)
    gathered = dict(inputs)
    gathered['u'] = inputs['u'].gather(2, index)
    gathered['z'] = inputs['z'].gather(2, index)
    steps = selective_scan_ref(**gathered, delta_softplus=True, positions=pos)
    expected = torch.empty_like(steps).scatter(2, index, steps)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def _tokens_major(t):
    """The same values as a (batch, C, K) view of a (batch, K, C) tensor."""
    return t.detach().transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize(
    'impl', ['chunked', pytest.param('cpu', marks=needs_ext)]
)
@pytest.mark.parametrize('mode', ['reverse', 'order', 'shared_order'])
@pytest.mark.parametrize(
    'dtype,rtol', [(torch.float64, 1e-10), (torch.float32, 2e-5)]
)
def test_scan_order_against_reference(impl, mode, dtype, rtol):
    batch, dim, K, L = 2, 5, 37, 70
    inputs = make_inputs(batch, dim, K, 16, dtype=dtype)
    kwargs = dict(delta_softplus=True, positions=random_positions(2, K, L))
    if mode == 'reverse':
        kwargs['reverse'] = True
    else:
        rows = 1 if mode == 'shared_order' else batch
        kwargs['order'] = torch.stack([torch.randperm(K) for _ in range(rows)])
    for gap_mode in ('prev', 'null', 'none'):
        compare(impl, inputs, rtol, gap_mode=gap_mode, **kwargs)


@needs_ext
@pytest.mark.parametrize('reverse', [False, True])
def test_kernel_reads_tokens_major_views(reverse):
    """(batch, dim, K) views of (batch, K, dim) tensors, and B, C as slices
    of one (batch, K, R + 2N) projection, need no copy; the output and the
    gradients keep the inputs' layouts."""
    batch, dim, K, N = 2, 6, 29, 16
    inputs = make_inputs(batch, dim, K, N)
    proj = torch.randn(batch, K, 3 + 2 * N, dtype=torch.float64)
    views = dict(inputs)
    for name in ('u', 'delta', 'z'):
        views[name] = _tokens_major(inputs[name]).requires_grad_()
    views['B'] = proj[..., 3 : 3 + N].transpose(1, 2).requires_grad_()
    views['C'] = proj[..., 3 + N :].transpose(1, 2).requires_grad_()
    plain = dict(inputs, B=views['B'].detach().contiguous().requires_grad_())
    plain['C'] = views['C'].detach().contiguous().requires_grad_()
    kwargs = dict(delta_softplus=True, reverse=reverse)
    y, grads = run('cpu', views, **kwargs)
    y_ref, grads_ref = run('ref', plain, **kwargs)
    assert y.stride(1) == 1 and y.transpose(1, 2).is_contiguous()
    assert_close_rel(y, y_ref, 1e-10)
    for g, g_ref, t in zip(grads, grads_ref, views.values()):
        assert_close_rel(g, g_ref, 1e-10)
        if t.dim() == 3 and t.stride(1) == 1:
            assert g.stride(1) == 1  # the kernel's tokens-major layout


@pytest.mark.parametrize('impl', ['ref', pytest.param('cpu', marks=needs_ext)])
def test_gradcheck_scan_order(impl):
    inputs = make_inputs(1, 2, 7, 3)
    pos = random_positions(1, 7, 12)
    order = torch.randperm(7)
    for kwargs in (dict(reverse=True), dict(order=order)):

        def fn(*tensors, kwargs=kwargs):
            return selective_scan(
                *tensors,
                delta_softplus=True,
                positions=pos,
                gap_mode='prev',
                impl=impl,
                **kwargs,
            )

        assert torch.autograd.gradcheck(fn, tuple(inputs.values()))


def test_order_errors():
    inputs = make_inputs(2, 3, 5, 4)
    with pytest.raises(ValueError, match='permutation'):
        selective_scan(**inputs, order=torch.tensor([0, 1, 1, 2, 3]))
    with pytest.raises(ValueError, match='exclusive'):
        selective_scan(**inputs, order=torch.arange(5), reverse=True)
    with pytest.raises(ValueError, match='order must be'):
        selective_scan(**inputs, order=torch.arange(4))
    with pytest.raises(TypeError, match='int64'):
        selective_scan(**inputs, order=torch.arange(5.0))


# ---------------------------------------------------------------------------
# The fused step-size projection (delta_proj, mamba-ssm's dt_proj): the
# scan of delta = delta_proj @ delta_low equals the scan of the projected
# step sizes, in the output and in every gradient (delta_low's and
# delta_proj's through the projection).
# ---------------------------------------------------------------------------
def low_rank_inputs(batch, dim, K, N, R, dtype=torch.float64, layout='tm'):
    """make_inputs with delta replaced by a low-rank input (batch, R, K)
    and its projection delta_proj (dim, R). layout 'tm': delta, B and C
    are slices of one tokens-major (batch, K, R + 2N) projection, u and z
    tokens-major views (the models' layout); 'contiguous': (batch, ., K)
    contiguous tensors."""
    inputs = make_inputs(batch, dim, K, N, dtype=dtype)
    x_dbl = torch.randn(batch, K, R + 2 * N, dtype=dtype)
    x_dbl[..., :R] *= 0.7
    if layout == 'tm':
        inputs['delta'] = x_dbl[..., :R].transpose(1, 2)
        inputs['B'] = x_dbl[..., R : R + N].transpose(1, 2)
        inputs['C'] = x_dbl[..., R + N :].transpose(1, 2)
        for name in ('u', 'z'):
            inputs[name] = _tokens_major(inputs[name])
    else:
        inputs['delta'] = x_dbl[..., :R].transpose(1, 2).contiguous()
    inputs['delta_proj'] = torch.randn(dim, R, dtype=dtype) * R**-0.5
    return {k: v.detach().requires_grad_() for k, v in inputs.items()}


def unfused_scan(delta, delta_proj, **kwargs):
    """The scan with dt_proj's GEMM first, as the models ran it."""
    delta = F.linear(delta.transpose(1, 2), delta_proj).transpose(1, 2)
    return selective_scan(delta=delta, **kwargs)


def compare_fused(impl, inputs, rtol, ref_impl='ref', **kwargs):
    """Fused ``impl`` against the unfused ``ref_impl``: output and the
    gradients of every input (delta_proj's included)."""
    y, g = output_and_grads(selective_scan, inputs, impl=impl, **kwargs)
    y_ref, g_ref = output_and_grads(
        unfused_scan, inputs, impl=ref_impl, **kwargs
    )
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert_close_rel(y, y_ref, rtol)
    tensors = [t for t in inputs.values() if t is not None]
    assert len(g) == len(g_ref) == len(tensors)
    for a, b, t in zip(g, g_ref, tensors):
        assert a.shape == b.shape == t.shape and a.dtype == t.dtype
        assert_close_rel(a, b, rtol)


@pytest.mark.parametrize(
    'impl', ['ref', 'chunked', pytest.param('cpu', marks=needs_ext)]
)
@pytest.mark.parametrize('layout', ['tm', 'contiguous'])
@pytest.mark.parametrize('mode', ['forward', 'reverse', 'order'])
@pytest.mark.parametrize(
    'dtype,rtol', [(torch.float64, 1e-10), (torch.float32, 2e-5)]
)
def test_fused_delta_proj_equals_unfused(impl, layout, mode, dtype, rtol):
    batch, dim, K, L, N, R = 2, 11, 70, 120, 16, 5
    inputs = low_rank_inputs(batch, dim, K, N, R, dtype, layout)
    kwargs = dict(delta_softplus=True)
    if mode == 'reverse':
        kwargs['reverse'] = True
    elif mode == 'order':
        kwargs['order'] = torch.stack([torch.randperm(K) for _ in range(2)])
    compare_fused(impl, inputs, rtol, **kwargs)  # dense
    kwargs['positions'] = random_positions(batch, K, L)
    for gap_mode in ('prev', 'null', 'none'):
        compare_fused(impl, inputs, rtol, gap_mode=gap_mode, **kwargs)


@pytest.mark.parametrize('impl', ['ref', pytest.param('cpu', marks=needs_ext)])
def test_fused_delta_proj_without_bias_or_softplus(impl):
    inputs = low_rank_inputs(2, 5, 9, 4, 3, layout='contiguous')
    inputs['delta_bias'] = None
    compare_fused(impl, inputs, 1e-10, positions=random_positions(2, 9, 20))


@pytest.mark.parametrize('impl', ['ref', pytest.param('cpu', marks=needs_ext)])
@pytest.mark.parametrize('gap_mode', ['prev', 'null'])
def test_gradcheck_delta_proj(impl, gap_mode):
    """float64 gradcheck through the fused projection (the kernel's
    d(delta) projected onto delta and delta_proj by GEMMs); K 70: two
    chunks of the kernel, 'prev' gaps across them."""
    inputs = low_rank_inputs(1, 3, 70, 2, 2)
    pos = random_positions(1, 70, 100)
    names = list(inputs)

    def fn(*tensors):
        return selective_scan(
            **dict(zip(names, tensors)),
            delta_softplus=True,
            positions=pos,
            gap_mode=gap_mode,
            impl=impl,
        )

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()))


@pytest.mark.parametrize(
    'changes,match',
    [
        (dict(delta_proj=torch.randn(4, 2)), r'delta_proj must be \(dim=3'),
        (dict(delta_proj=torch.randn(3)), r'delta_proj must be \(dim=3'),
        (
            dict(delta_proj=torch.randn(3, 2, 1)),
            r'delta_proj must be \(dim=3',
        ),
        (
            dict(delta_proj=torch.randn(3, 4)),
            r'delta must have shape \(2, 4, 6\) \(batch, R, K\)',
        ),
    ],
)
def test_bad_delta_proj(changes, match):
    """delta (batch, R, K) with delta_proj (dim, R): the shapes are checked
    before any implementation runs."""
    inputs = make_inputs(2, 3, 6, 4)
    inputs['delta'] = torch.randn(2, 2, 6, dtype=torch.float64)
    for impl in ('ref', 'cpu'):
        with pytest.raises(ValueError, match=match):
            selective_scan(**dict(inputs, **changes), impl=impl)
    with pytest.raises(TypeError, match='delta_proj must be a floating'):
        selective_scan(
            **dict(inputs, delta_proj=torch.ones(3, 2, dtype=torch.long))
        )
