import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mmssm.ops import causal_conv1d, causal_conv1d_ref
from mmssm.testing import (
    assert_close_rel,
    needs_ext,
    output_and_grads,
    random_positions,
)

ext_module = importlib.import_module('mmssm.ops.ext')

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_inputs(batch, E, K, k=4, dtype=torch.float64, with_bias=True):
    inputs = dict(
        x=torch.randn(batch, E, K, dtype=dtype),
        weight=torch.randn(E, k, dtype=dtype),
        bias=torch.randn(E, dtype=dtype) if with_bias else None,
    )
    for t in inputs.values():
        if t is not None:
            t.requires_grad_()
    return inputs


def run(impl, inputs, **kwargs):
    """Output and the gradients of a fixed random projection of it."""
    return output_and_grads(causal_conv1d, inputs, impl=impl, **kwargs)


def compare(inputs, rtol, **kwargs):
    y_ref, g_ref = run('ref', inputs, **kwargs)
    y, g = run('cpu', inputs, **kwargs)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert_close_rel(y, y_ref, rtol)
    assert len(g) == len(g_ref)
    for a, b in zip(g, g_ref):
        assert a.dtype == b.dtype
        assert_close_rel(a, b, rtol)


# --------------------------------------------------------------------------
# The kernel against the reference.
# --------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('activation', [None, 'silu'])
@pytest.mark.parametrize('with_bias', [True, False])
@pytest.mark.parametrize('with_positions', [False, True])
def test_cpu_vs_ref(dtype, activation, with_bias, with_positions):
    torch.manual_seed(0)
    batch, E, K, L = 3, 10, 37, 80
    inputs = make_inputs(batch, E, K, dtype=dtype, with_bias=with_bias)
    pos = random_positions(batch, K, L) if with_positions else None
    compare(inputs, RTOL[dtype], positions=pos, activation=activation)


@needs_ext
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_long_rows_use_the_vector_path(dtype):
    """K >= 16: the 16-wide SiLU and its scalar tail."""
    torch.manual_seed(1)
    inputs = make_inputs(2, 6, 53, dtype=dtype)
    for pos in (None, random_positions(2, 53, 70)):
        compare(inputs, RTOL[dtype], positions=pos, activation='silu')


@needs_ext
@pytest.mark.parametrize(
    'positions',
    [
        # first position > 0, gaps larger than k, batch-varying
        [[3, 4, 9, 10, 11, 20, 22, 23], [0, 2, 5, 6, 7, 8, 30, 31]],
        # only gaps > k: every token sees itself alone
        [[0, 5, 10, 15, 20, 25, 30, 35], [1, 7, 13, 19, 25, 31, 37, 43]],
        # every distance d = 1..3 at every tap
        [[0, 1, 3, 6, 7, 9, 12, 13], [2, 3, 4, 5, 6, 7, 8, 9]],
    ],
)
@pytest.mark.parametrize('activation', [None, 'silu'])
def test_positions_cases(positions, activation):
    torch.manual_seed(2)
    inputs = make_inputs(2, 5, 8)
    pos = torch.tensor(positions)
    compare(inputs, 1e-10, positions=pos, activation=activation)


@needs_ext
@pytest.mark.parametrize('k', [1, 2, 4, 7])
def test_kernel_sizes(k):
    torch.manual_seed(3)
    inputs = make_inputs(2, 4, 15, k=k)
    for pos in (None, random_positions(2, 15, 33)):
        compare(inputs, 1e-10, positions=pos, activation='silu')


@needs_ext
@pytest.mark.parametrize('K', [0, 1, 2])
@pytest.mark.parametrize('with_positions', [False, True])
def test_short_sequences(K, with_positions):
    inputs = make_inputs(2, 3, K)
    pos = random_positions(2, K, 9) if with_positions else None
    compare(inputs, 1e-10, positions=pos, activation='silu')
    y = causal_conv1d(**inputs, positions=pos, impl='cpu')
    assert y.shape == (2, 3, K)
    if K:  # weight and bias still get (zero or not) gradients
        y.sum().backward()
        assert inputs['weight'].grad is not None
        assert inputs['bias'].grad is not None


@needs_ext
def test_shared_positions_and_seq_len():
    """(K,) positions broadcast over the batch; seq_len changes nothing."""
    torch.manual_seed(4)
    inputs = make_inputs(3, 4, 6)
    pos = torch.tensor([1, 2, 4, 8, 9, 10])
    y = causal_conv1d(**inputs, positions=pos, impl='cpu')
    for impl in ('ref', 'cpu'):
        for seq_len in (11, 40):
            other = causal_conv1d(
                **inputs,
                positions=pos.expand(3, 6),
                seq_len=seq_len,
                impl=impl,
            )
            assert_close_rel(other, y, 1e-12)


@needs_ext
def test_non_contiguous_and_conv_layout():
    torch.manual_seed(5)
    inputs = make_inputs(2, 6, 19)
    pos = random_positions(2, 19, 40)
    strided = dict(
        x=inputs['x'].detach().transpose(1, 2).contiguous().transpose(1, 2),
        weight=inputs['weight'].detach()[:, None].expand(6, 3, 4)[:, :1],
        bias=inputs['bias'].detach()[::1],
    )
    assert not strided['x'].is_contiguous()
    for t in strided.values():
        t.requires_grad_()
    y, g = run('cpu', strided, positions=pos, activation='silu')
    y_ref, g_ref = run('ref', inputs, positions=pos, activation='silu')
    assert_close_rel(y, y_ref, 1e-10)
    assert g[1].shape == (6, 1, 4)  # the gradient in the weight's layout
    for a, b in zip(g, g_ref):
        assert_close_rel(a.reshape(b.shape), b, 1e-10)


@needs_ext
@pytest.mark.parametrize('k', [1, 2, 4, 7])
@pytest.mark.parametrize('reverse', [False, True])
@pytest.mark.parametrize('threads', [1, 2])
def test_tokens_major_rows(k, reverse, threads):
    """Tokens-major inputs (in_proj's layout) run the forward step by step
    over all channels (forward_rows), the others tile by tile: both against
    the reference, and equal to each other, with whole vectors and a tail of
    channels, several chunks of steps and every number of taps."""
    torch.manual_seed(7)
    batch, E, K = 2, 21, 40
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype in (torch.float64, torch.float32):
            x = torch.randn(batch, K, 2 * E, dtype=dtype)[..., :E]
            tokens_major = x.transpose(1, 2)  # a view, as in Vim's mixer
            w = torch.randn(E, k, dtype=dtype)
            b = torch.randn(E, dtype=dtype)
            for pos in (None, random_positions(batch, K, 70)):
                kwargs = dict(
                    positions=pos, activation='silu', reverse=reverse
                )
                y = causal_conv1d(tokens_major, w, b, impl='cpu', **kwargs)
                tiles = causal_conv1d(
                    tokens_major.contiguous(), w, b, impl='cpu', **kwargs
                )
                ref = causal_conv1d(tokens_major, w, b, impl='ref', **kwargs)
                assert y.stride(1) == 1  # written in the input's layout
                assert torch.equal(y, tiles)
                assert_close_rel(y, ref, RTOL[dtype])
    finally:
        torch.set_num_threads(previous)


@needs_ext
@pytest.mark.parametrize('threads', [1, 2])
def test_threads(threads):
    """Rows split over threads; dweight/dbias summed in a fixed order."""
    torch.manual_seed(6)
    inputs = make_inputs(3, 9, 40)
    pos = random_positions(3, 40, 90)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        compare(inputs, 1e-10, positions=pos, activation='silu')
        _, g = run('cpu', inputs, positions=pos, activation='silu')
    finally:
        torch.set_num_threads(previous)
    _, g1 = run('cpu', inputs, positions=pos, activation='silu')
    for a, b in zip(g, g1):  # deterministic whatever the thread count
        assert torch.equal(a, b)


@needs_ext
@pytest.mark.parametrize('with_positions', [False, True])
@pytest.mark.parametrize('activation', [None, 'silu'])
def test_gradcheck(with_positions, activation):
    torch.manual_seed(7)
    inputs = make_inputs(2, 3, 9)
    pos = random_positions(2, 9, 16) if with_positions else None

    def fn(x, weight, bias):
        return causal_conv1d(
            x, weight, bias, pos, activation=activation, impl='cpu'
        )

    assert torch.autograd.gradcheck(
        fn, (inputs['x'], inputs['weight'], inputs['bias'])
    )


@needs_ext
def test_low_precision_inputs_compute_in_float32():
    torch.manual_seed(8)
    inputs = make_inputs(2, 4, 12, dtype=torch.bfloat16)
    y, g = run('cpu', inputs, activation='silu')
    assert y.dtype == torch.bfloat16
    assert [t.dtype for t in g] == [torch.bfloat16] * 3
    y_ref, _ = run('ref', inputs, activation='silu')
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------
# The reference.
# --------------------------------------------------------------------------
@pytest.mark.parametrize('impl', ['ref', pytest.param('cpu', marks=needs_ext)])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_no_positions_is_the_dense_causal_conv(impl, dtype):
    torch.manual_seed(9)
    x = torch.randn(2, 5, 13, dtype=dtype)
    w = torch.randn(5, 1, 4, dtype=dtype)
    b = torch.randn(5, dtype=dtype)
    dense = F.conv1d(F.pad(x, (3, 0)), w, b, groups=5)
    y = causal_conv1d(x, w, b, impl=impl)
    torch.testing.assert_close(y, dense, rtol=RTOL[dtype], atol=1e-6)
    y = causal_conv1d(x, w, b, activation='silu', impl=impl)
    torch.testing.assert_close(y, F.silu(dense), rtol=RTOL[dtype], atol=1e-6)


@pytest.mark.parametrize('impl', ['ref', pytest.param('cpu', marks=needs_ext)])
def test_all_positions_equal_dense_exactly(impl):
    torch.manual_seed(10)
    inputs = make_inputs(2, 5, 11)
    dense = causal_conv1d(**inputs, activation='silu', impl=impl)
    pos = torch.arange(11)
    assert torch.equal(
        causal_conv1d(**inputs, positions=pos, activation='silu', impl=impl),
        dense,
    )


def test_ref_is_the_full_length_conv_read_at_the_positions():
    """The definition, spelled out: zeros at the pruned positions."""
    torch.manual_seed(11)
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    w = torch.randn(3, 4, dtype=torch.float64)
    pos = torch.tensor([[1, 2, 6, 7, 9], [0, 4, 5, 8, 12]])
    y = causal_conv1d_ref(x, w, positions=pos, seq_len=13)
    for n in range(2):
        full = torch.zeros(3, 13, dtype=torch.float64)
        full[:, pos[n]] = x[n]
        for j, p in enumerate(pos[n].tolist()):
            expected = sum(
                w[:, 3 - d] * full[:, p - d] for d in range(4) if p - d >= 0
            )
            torch.testing.assert_close(y[n, :, j], expected)


# --------------------------------------------------------------------------
# Dispatch and input checks.
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    'kwargs, match',
    [
        (dict(x=torch.randn(2, 3)), 'x must be'),
        (dict(weight=torch.randn(4, 4)), 'weight must be'),
        (dict(weight=torch.randn(3, 2, 4)), 'weight must be'),
        (dict(bias=torch.randn(4)), 'bias must have shape'),
        (dict(positions=torch.arange(4)), 'positions must be'),
        (
            dict(positions=torch.tensor([0, 2, 2, 3, 4])),
            'positions must be strictly increasing',
        ),
        (
            dict(positions=torch.tensor([-1, 2, 3, 4, 5])),
            'positions must be non-negative',
        ),
        (
            dict(positions=torch.arange(3, 8), seq_len=7),
            'beyond seq_len',
        ),
        (dict(seq_len=9), 'seq_len'),
        (dict(seq_len=5.0), 'seq_len'),
        (dict(activation='relu'), 'activation'),
    ],
)
@pytest.mark.parametrize('impl', ['ref', pytest.param('cpu', marks=needs_ext)])
def test_bad_inputs(kwargs, match, impl):
    args = dict(
        x=torch.randn(2, 3, 5), weight=torch.randn(3, 4), bias=torch.randn(3)
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        causal_conv1d(**args, impl=impl)


@pytest.mark.parametrize('impl', ['ref', pytest.param('cpu', marks=needs_ext)])
def test_bad_input_types(impl):
    """A wrong type is a TypeError, as in the selective scan."""
    x, w = torch.randn(2, 3, 5), torch.randn(3, 4)
    with pytest.raises(TypeError, match='x must be a floating'):
        causal_conv1d(x.long(), w, impl=impl)
    for positions in (torch.arange(5).int(), [0, 1, 2, 3, 4]):
        with pytest.raises(TypeError, match='positions must be'):
            causal_conv1d(x, w, positions=positions, impl=impl)


def test_bad_impl(monkeypatch):
    x, w = torch.randn(1, 2, 3), torch.randn(2, 4)
    with pytest.raises(ValueError, match='impl'):
        causal_conv1d(x, w, impl='cuda')
    monkeypatch.setenv('MMSSM_CONV_IMPL', 'fast')
    with pytest.raises(ValueError, match='MMSSM_CONV_IMPL'):
        causal_conv1d(x, w)


def test_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(ext_module, '_ext', None)
    monkeypatch.setattr(ext_module, '_error', 'ImportError: test')
    monkeypatch.setattr(ext_module, '_warned', set())
    inputs = make_inputs(2, 3, 6)
    with pytest.warns(UserWarning, match="missing.*'ref' conv"):
        y = causal_conv1d(**inputs)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert torch.equal(causal_conv1d(**inputs), y)  # warned once only
    assert torch.equal(causal_conv1d_ref(**inputs), y)
    with pytest.raises(RuntimeError, match="impl='cpu'"):
        causal_conv1d(**inputs, impl='cpu')


def test_stale_extension_is_reported(monkeypatch):
    monkeypatch.setattr(ext_module, '_ext', object())
    monkeypatch.setattr(ext_module, '_warned', set())
    inputs = make_inputs(1, 2, 3)
    with pytest.warns(UserWarning, match='without the causal conv1d'):
        causal_conv1d(**inputs)


class _CountingExt:
    """The loaded extension, counting the calls of the conv's forward."""

    def __init__(self, ext):
        self.ext = ext
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.ext, name)

    def causal_conv1d_fwd(self, *args):
        self.calls += 1
        return self.ext.causal_conv1d_fwd(*args)


@needs_ext
def test_auto_is_the_kernel_on_cpu(monkeypatch):
    counting = _CountingExt(ext_module.load_ext())
    monkeypatch.setattr(ext_module, '_ext', counting)
    inputs = make_inputs(1, 2, 3)
    causal_conv1d(**inputs)
    assert counting.calls == 1
    with torch.device('cpu'):  # a TorchFunctionMode: still the kernel
        causal_conv1d(**inputs)
    assert counting.calls == 2
    monkeypatch.setenv('MMSSM_CONV_IMPL', 'ref')
    causal_conv1d(**inputs)
    assert counting.calls == 2


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('impl', ['ref', pytest.param('cpu', marks=needs_ext)])
def test_a_dispatch_mode_sees_one_op(impl):
    """The conv is one custom op, whichever implementation runs: a
    dispatch mode (such as the FLOP counter) sees it and not the
    operations inside it."""
    inputs = make_inputs(2, 3, 5)
    positions = torch.tensor([0, 2, 3, 6, 7])
    expected = causal_conv1d(**inputs, positions=positions, impl=impl)
    with torch.no_grad(), _RecordOps() as mode:
        out = causal_conv1d(**inputs, positions=positions, impl=impl)
    ours = [f for f in mode.seen if f.namespace == 'mmssm']
    assert ours == [torch.ops.mmssm.causal_conv1d.default]
    aten = torch.ops.aten  # the reference's scatter / conv / gather
    inner = {aten.scatter.src, aten.convolution.default, aten.gather.default}
    assert not inner & set(mode.seen)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------
# Reversed (anti-causal) conv and layouts.
# --------------------------------------------------------------------------
@pytest.mark.parametrize('with_positions', [False, True])
def test_reverse_is_the_conv_of_the_flipped_sequence(with_positions):
    torch.manual_seed(9)
    inputs = make_inputs(2, 5, 17)
    pos = random_positions(2, 17, 40) if with_positions else None
    y = causal_conv1d_ref(**inputs, positions=pos, reverse=True)
    flipped = dict(inputs, x=inputs['x'].flip(-1))
    pos_f = None if pos is None else pos[:, -1:] - pos.flip(-1)
    expected = causal_conv1d_ref(**flipped, positions=pos_f).flip(-1)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@needs_ext
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('with_positions', [False, True])
@pytest.mark.parametrize('tokens_major', [False, True])
def test_reverse_and_layouts_cpu_vs_ref(dtype, with_positions, tokens_major):
    torch.manual_seed(10)
    inputs = make_inputs(3, 10, 37, dtype=dtype)
    if tokens_major:  # a (batch, E, K) view of a (batch, K, E) tensor
        x = inputs['x'].detach().transpose(1, 2).contiguous()
        inputs['x'] = x.transpose(1, 2).requires_grad_()
    pos = random_positions(3, 37, 80) if with_positions else None
    for reverse in (False, True):
        compare(
            inputs,
            RTOL[dtype],
            positions=pos,
            activation='silu',
            reverse=reverse,
        )
    y, (dx, *_) = run('cpu', inputs, positions=pos, reverse=True)
    assert (y.stride(1) == 1) == tokens_major  # the layout of x
    assert (dx.stride(1) == 1) == tokens_major


@needs_ext
def test_gradcheck_reverse():
    torch.manual_seed(11)
    inputs = make_inputs(2, 3, 9)
    pos = random_positions(2, 9, 16)

    def fn(x, weight, bias):
        return causal_conv1d(
            x, weight, bias, pos, activation='silu', impl='cpu', reverse=True
        )

    assert torch.autograd.gradcheck(
        fn, (inputs['x'], inputs['weight'], inputs['bias'])
    )
