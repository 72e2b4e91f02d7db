"""The ops as torch.library custom ops: lean imports, the meta device,
torch.compile, torch.library.opcheck and the FLOP counter."""

import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmssm.ops import causal_conv1d, ext_status, selective_scan
from mmssm.testing import in_ci, needs_ext, random_positions

SCAN_IMPLS = ['ref', 'chunked', pytest.param('cpu', marks=needs_ext)]
CONV_IMPLS = ['ref', pytest.param('cpu', marks=needs_ext)]


def scan_inputs(batch=2, dim=3, K=6, N=4, dtype=torch.float64, device='cpu'):
    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    return dict(
        u=randn(batch, dim, K),
        delta=0.5 * randn(batch, dim, K),
        A=-torch.rand(dim, N, dtype=dtype, device=device) - 0.2,
        B=randn(batch, N, K),
        C=randn(batch, N, K),
        D=randn(dim),
        z=randn(batch, dim, K),
        delta_bias=randn(dim),
    )


def conv_inputs(batch=2, E=3, K=6, k=4, dtype=torch.float64, device='cpu'):
    return dict(
        x=torch.randn(batch, E, K, dtype=dtype, device=device),
        weight=torch.randn(E, k, dtype=dtype, device=device),
        bias=torch.randn(E, dtype=dtype, device=device),
    )


def requiring_grad(inputs):
    return {k: v.clone().requires_grad_() for k, v in inputs.items()}


def run_script(code):
    out = subprocess.run(
        [sys.executable, '-c', code], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_mmssm_loads_neither_the_ops_nor_the_extension():
    """``import mmssm`` stays light: no ops stack, no compiled extension,
    no FLOP counter; ``import mmssm.ops`` registers the ops but loads the
    extension only when a kernel is first needed."""
    out = run_script(
        'import sys\n'
        'import mmssm, mmssm.utils\n'
        "exts = ('mmssm._ext', 'mmssm._ext_avx2')\n"
        "heavy = ('mmssm.ops', *exts, 'mmssm.utils.flops')\n"
        'print(sorted(m for m in heavy if m in sys.modules))\n'
        'import mmssm.ops\n'
        'print(any(m in sys.modules for m in exts))\n'
        'status = mmssm.ops.ext_status()\n'
        'loaded = any(m in sys.modules for m in exts)\n'
        "print(loaded == (status == 'built'))\n"
    )
    assert out.splitlines() == ['[]', 'False', 'True']


def test_count_flops_still_importable_from_utils():
    out = run_script(
        'import sys\n'
        'from mmssm.utils import count_flops\n'
        'from mmssm.utils.flops import count_flops as direct\n'
        "exts = ('mmssm._ext', 'mmssm._ext_avx2')\n"
        'print(count_flops is direct, any(m in sys.modules for m in exts))\n'
    )
    assert out == 'True False'


@pytest.mark.parametrize('ci', ['', 'true'])
def test_needs_ext_fails_in_ci(ci):
    """Without an importable extension, ``needs_ext`` skips a kernel test
    on a user's machine, and in CI (``CI=true``) lets it run and fail."""
    code = (
        'import sys\n'
        "sys.modules['mmssm._ext'] = None  # the imports fail\n"
        "sys.modules['mmssm._ext_avx2'] = None\n"
        'from mmssm.testing import needs_ext\n'
        'print(needs_ext.mark.args[0])\n'
    )
    env = dict(os.environ, CI=ci)
    out = subprocess.run(
        [sys.executable, '-c', code], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ('False' if ci else 'True')


def test_extension_loads_in_ci():
    """In CI the compiled extension must import (a build that does not
    import fails here, and the kernel tests fail instead of skipping)."""
    if not in_ci():
        pytest.skip('not in CI (CI=true)')
    assert ext_status() == 'built'


# --------------------------------------------------------------------------
# The meta device.
# --------------------------------------------------------------------------
@pytest.mark.parametrize('impl', ['auto', 'ref', 'chunked', 'cpu'])
def test_scan_on_the_meta_device(impl):
    inputs = requiring_grad(scan_inputs(dtype=torch.float32, device='meta'))
    positions = torch.tensor([0, 2, 3, 7, 8, 11], device='meta')
    y = selective_scan(
        **inputs, delta_softplus=True, positions=positions, impl=impl
    )
    assert y.device.type == 'meta' and y.shape == (2, 3, 6)
    assert y.dtype == torch.float32
    y.sum().backward()
    for t in inputs.values():
        assert t.grad.shape == t.shape and t.grad.device.type == 'meta'


@pytest.mark.parametrize('impl', ['auto', 'ref', 'cpu'])
def test_conv_on_the_meta_device(impl):
    inputs = requiring_grad(conv_inputs(dtype=torch.bfloat16, device='meta'))
    positions = torch.tensor([0, 2, 3, 7, 8, 11], device='meta')
    y = causal_conv1d(
        **inputs, positions=positions, activation='silu', impl=impl
    )
    assert y.device.type == 'meta' and y.shape == (2, 3, 6)
    assert y.dtype == torch.bfloat16
    y.sum().backward()
    for t in inputs.values():
        assert t.grad.shape == t.shape


# --------------------------------------------------------------------------
# torch.library.opcheck: schema, fake implementation, autograd registration.
# --------------------------------------------------------------------------
@pytest.mark.parametrize('impl', SCAN_IMPLS)
def test_opcheck_scan(impl):
    inputs = requiring_grad(scan_inputs())
    positions = random_positions(2, 6, 15)
    args = (*inputs.values(), True, positions, 'prev', impl)
    torch.library.opcheck(torch.ops.mmssm.selective_scan.default, args)


@needs_ext
def test_opcheck_scan_with_checkpoints():
    """The compiled kernel's forward with its chunk checkpoints (the
    op's second output, for its backward): K 70, two chunks."""
    inputs = requiring_grad(scan_inputs(K=70))
    positions = random_positions(2, 70, 90)
    args = (*inputs.values(), True, positions, 'prev', 'cpu', False, None)
    torch.library.opcheck(
        torch.ops.mmssm.selective_scan.default, (*args, True)
    )


@pytest.mark.parametrize('impl', CONV_IMPLS)
def test_opcheck_conv(impl):
    inputs = requiring_grad(conv_inputs())
    positions = random_positions(2, 6, 15)
    args = (*inputs.values(), positions, 20, True, impl)
    torch.library.opcheck(torch.ops.mmssm.causal_conv1d.default, args)


# --------------------------------------------------------------------------
# torch.compile.
# --------------------------------------------------------------------------
def _outputs_and_grads(fn, scan, conv):
    scan, conv = requiring_grad(scan), requiring_grad(conv)
    y_scan, y_conv = fn(scan, conv)
    (y_scan.sum() + (y_conv * y_conv).sum()).backward()
    grads = [t.grad for t in (*scan.values(), *conv.values())]
    return [y_scan, y_conv, *grads]


@pytest.mark.parametrize('impl', SCAN_IMPLS)
def test_torch_compile_fullgraph(impl):
    """The ops trace into one graph (aot_eager: forward and backward)
    and give what they give eagerly."""
    torch._dynamo.reset()
    scan, conv = scan_inputs(), conv_inputs()
    positions = random_positions(2, 6, 15)
    conv_impl = 'ref' if impl == 'chunked' else impl

    def fn(s, c):
        y = selective_scan(
            **s, delta_softplus=True, positions=positions, impl=impl
        )
        out = causal_conv1d(
            **c, positions=positions, activation='silu', impl=conv_impl
        )
        return y, out

    eager = _outputs_and_grads(fn, scan, conv)
    compiled_fn = torch.compile(fn, backend='aot_eager', fullgraph=True)
    compiled = _outputs_and_grads(compiled_fn, scan, conv)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------
# The FLOP counter: one op per call, whichever implementation runs.
# --------------------------------------------------------------------------
@pytest.mark.parametrize('impl', ['auto', *SCAN_IMPLS])
def test_flop_counter_sees_one_scan(impl):
    inputs = scan_inputs(batch=2, dim=3, K=6, N=4)
    positions = torch.tensor([0, 2, 3, 7, 8, 11])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        selective_scan(**inputs, positions=positions, impl=impl)
    # torch's unit, 2 FLOPs per MAC; the 'plainmamba' convention, 9 MACs
    # per scanned element (none of the einsums inside the scan counted)
    counts = counter.get_flop_counts()['Global']
    assert counts == {torch.ops.mmssm.selective_scan: 2 * 9 * 2 * 6 * 3 * 4}


@pytest.mark.parametrize('impl', ['auto', *CONV_IMPLS])
def test_flop_counter_sees_one_conv(impl):
    inputs = conv_inputs(batch=2, E=3, K=6, k=4, dtype=torch.float32)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        causal_conv1d(**inputs, positions=torch.arange(1, 7), impl=impl)
    counts = counter.get_flop_counts()['Global']
    assert counts == {torch.ops.mmssm.causal_conv1d: 2 * 2 * 3 * 6 * 4}


@pytest.mark.parametrize('impl', SCAN_IMPLS)
def test_flop_counter_counts_the_backward(impl):
    """A backward pass counts twice its forward (as torch's formulas)."""
    inputs = requiring_grad(scan_inputs(batch=1, dim=2, K=5, N=3))
    with FlopCounterMode(display=False) as counter:
        selective_scan(**inputs, impl=impl).sum().backward()
    scan = 2 * 9 * 1 * 5 * 2 * 3
    assert counter.get_flop_counts()['Global'][
        torch.ops.mmssm.selective_scan
    ] == (scan)
    if impl == 'cpu':  # the kernel's backward is an op of its own
        backward = torch.ops.mmssm.selective_scan_backward
        assert counter.get_flop_counts()['Global'][backward] == 2 * scan


# --------------------------------------------------------------------------
# The fused step-size projection (delta_proj): meta shapes, opcheck, FLOPs.
# --------------------------------------------------------------------------
def low_rank_scan_inputs(batch=2, dim=3, K=6, N=4, R=2, device='cpu'):
    """scan_inputs with delta the low-rank (batch, R, K) input of
    delta_proj (dim, R)."""
    inputs = scan_inputs(batch, dim, K, N, device=device)
    inputs['delta'] = torch.randn(batch, R, K, dtype=torch.float64)
    inputs['delta'] = inputs['delta'].to(device)
    inputs['delta_proj'] = torch.randn(dim, R, dtype=torch.float64)
    inputs['delta_proj'] = inputs['delta_proj'].to(device)
    return inputs


@pytest.mark.parametrize('impl', ['auto', 'ref', 'chunked', 'cpu'])
def test_scan_with_delta_proj_on_the_meta_device(impl):
    inputs = requiring_grad(low_rank_scan_inputs(device='meta'))
    positions = torch.tensor([0, 2, 3, 7, 8, 11], device='meta')
    y = selective_scan(
        **inputs, delta_softplus=True, positions=positions, impl=impl
    )
    assert y.device.type == 'meta' and y.shape == (2, 3, 6)
    y.sum().backward()
    for t in inputs.values():
        assert t.grad.shape == t.shape and t.grad.device.type == 'meta'


def _low_rank_op_args(impl, K=6, checkpoints=False):
    inputs = requiring_grad(low_rank_scan_inputs(K=K))
    positions = random_positions(2, K, K + 9)
    proj = inputs.pop('delta_proj')
    args = (*inputs.values(), True, positions, 'prev', impl, False, None)
    return (*args, checkpoints, proj)


@pytest.mark.parametrize('impl', SCAN_IMPLS)
def test_opcheck_scan_with_delta_proj(impl):
    torch.library.opcheck(
        torch.ops.mmssm.selective_scan.default, _low_rank_op_args(impl)
    )


@needs_ext
def test_opcheck_scan_with_delta_proj_and_checkpoints():
    args = _low_rank_op_args('cpu', K=70, checkpoints=True)
    torch.library.opcheck(torch.ops.mmssm.selective_scan.default, args)


@needs_ext
def test_opcheck_kernel_backward_with_delta_proj():
    """The kernel's backward op: the gradient of the full step sizes
    (batch, dim, K) in the place of delta's."""
    args = _low_rank_op_args('cpu', K=70)
    u, delta, A, B, C, D, z, bias, softplus, positions, gap_mode = args[:11]
    dout = torch.randn(2, 3, 70, dtype=torch.float64)
    bwd_args = (dout, u, delta, A, B, C, D, z, bias, softplus, positions)
    bwd_args = (*bwd_args, gap_mode, False, None, None, args[-1])
    detached = tuple(
        t.detach() if isinstance(t, torch.Tensor) else t for t in bwd_args
    )
    torch.library.opcheck(
        torch.ops.mmssm.selective_scan_backward.default, detached
    )
    grads = torch.ops.mmssm.selective_scan_backward(*detached)
    assert grads[1].shape == (2, 3, 70)


@pytest.mark.parametrize('impl', ['auto', *SCAN_IMPLS])
def test_flop_counter_counts_the_fused_projection(impl):
    """The scan with delta_proj counts the projection's batch*K*dim*R
    MACs (what dt_proj's GEMM counted) besides the scan's."""
    inputs = low_rank_scan_inputs(batch=2, dim=3, K=6, N=4, R=2)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        selective_scan(**inputs, impl=impl)
    counts = counter.get_flop_counts()['Global']
    scan, proj = 9 * 2 * 6 * 3 * 4, 2 * 6 * 3 * 2
    assert counts == {torch.ops.mmssm.selective_scan: 2 * (scan + proj)}


@needs_ext
def test_fused_projection_counts_as_the_unfused():
    """Forward and backward of the kernel: the fused projection counts as
    many FLOPs as the GEMM it replaces (forward) and its gradients' GEMMs
    (backward). (The PyTorch implementations' backward reruns their
    forward, whose inner ops the counter sees.)"""

    def total(fused):
        inputs = requiring_grad(low_rank_scan_inputs(R=2))
        with FlopCounterMode(display=False) as counter:
            if not fused:
                proj = inputs.pop('delta_proj')
                inputs['delta'] = torch.nn.functional.linear(
                    inputs['delta'].transpose(1, 2), proj
                ).transpose(1, 2)
            selective_scan(**inputs, impl='cpu').sum().backward()
        return counter.get_total_flops()

    assert total(True) == total(False) > 0


@pytest.mark.parametrize('impl', SCAN_IMPLS)
def test_torch_compile_fullgraph_with_delta_proj(impl):
    torch._dynamo.reset()
    inputs = low_rank_scan_inputs()
    positions = random_positions(2, 6, 15)

    def fn(s):
        return selective_scan(
            **s, delta_softplus=True, positions=positions, impl=impl
        )

    def outputs_and_grads(f):
        s = requiring_grad(inputs)
        y = f(s)
        y.sum().backward()
        return [y, *(t.grad for t in s.values())]

    eager = outputs_and_grads(fn)
    compiled = outputs_and_grads(
        torch.compile(fn, backend='aot_eager', fullgraph=True)
    )
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
