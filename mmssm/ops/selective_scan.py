"""Selective scan with pruning-aware hidden-state alignment: the dispatcher.

:func:`selective_scan` checks its arguments and calls the custom op
``torch.ops.mmssm.selective_scan``, which runs one of the implementations
('ref' and 'chunked' in PyTorch, 'cpu' the compiled kernel, 'cuda'
mamba-ssm's kernel) and has a fake (meta) implementation and a FLOP formula,
so that ``torch.compile``, the meta device and
``torch.utils.flop_counter`` see one op whichever implementation runs. The
math, the gap modes and the implementations are described in docs/scan.md.
"""

import os
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import (
    GAP_MODES,
    check_order,
    check_scan_inputs,
    empty_layout,
    match_layout,
)
from .ext import cpu_kernel_skip_reason, load_ext, warn_once
from .reference import (
    align_to_dense,
    compute_dtype,
    finish_scan,
    from_scan_order,
    project_delta,
    recurrence_chunked,
    recurrence_loop,
    scan_unchecked,
    to_scan_order,
)

__all__ = ['GAP_MODES', 'IMPLS', 'SCAN_CHUNK', 'selective_scan']

IMPLS = ('auto', 'ref', 'chunked', 'cpu', 'cuda')
#: Steps per chunk of the compiled kernel (``kScanChunk``, exported as
#: ``scan_chunk``): its forward's checkpoints are the states before each
#: chunk, (batch, dim, ceil(K / SCAN_CHUNK), N).
SCAN_CHUNK = 64
_GAP_MODE_IDS = {'none': 0, 'prev': 1, 'null': 2}
_NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')


def _cpu_skip_reason(u: Tensor) -> str:
    # 'scan_chunk': builds of older sources have another signature
    return cpu_kernel_skip_reason(
        u, 'scan_chunk', 'selective scan (with checkpoints)'
    )


def _mamba_skip_reason(u: Tensor) -> str:
    if u.device.type != 'cuda':
        return f"impl 'cuda' needs CUDA tensors, got {u.device.type}"
    try:
        import mamba_ssm.ops.selective_scan_interface  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA extension
        return f'mamba-ssm is not usable ({e})'
    return ''


def _resolve_impl(impl: str, u: Tensor) -> str:
    """The implementation that runs: 'auto' resolved, availability checked.

    Called by the op when it runs and again when its gradient is set up, so
    that the backward pass runs the same implementation as the forward.
    """
    if u.device.type == 'meta':  # shapes only: the kernel's backward
        return 'cpu'  # op has a fake implementation, which gives them
    if impl == 'auto':
        impl = os.environ.get('MMSSM_SCAN_IMPL', 'auto')
        if impl not in IMPLS:
            raise ValueError(
                f'MMSSM_SCAN_IMPL must be one of {IMPLS}, got {impl!r}'
            )
    if impl == 'auto':
        if u.device.type == 'cuda':
            reason = _mamba_skip_reason(u)
            impl = 'cuda' if not reason else 'chunked'
        else:
            reason = _cpu_skip_reason(u)
            impl = 'cpu' if not reason else 'chunked'
        if reason:
            warn_once(
                f'selective_scan: {reason}; using the PyTorch '
                "'chunked' scan instead (slower)."
            )
    elif impl == 'cuda':
        reason = _mamba_skip_reason(u)
        if reason:
            raise RuntimeError(f"selective_scan impl='cuda': {reason}")
    elif impl == 'cpu':
        reason = _cpu_skip_reason(u)
        if reason:
            raise RuntimeError(f"selective_scan impl='cpu': {reason}")
    return impl


def _run(
    impl: str,
    inputs: tuple,
    delta_softplus,
    positions,
    gap_mode,
    reverse=False,
    order=None,
    delta_proj=None,
):
    """The forward of a resolved implementation, on checked inputs, in the
    layout of the fake implementation (:func:`empty_layout` of ``u``)."""
    u = inputs[0]
    if impl in ('ref', 'chunked'):
        recurrence = recurrence_loop if impl == 'ref' else recurrence_chunked
        y = scan_unchecked(
            recurrence,
            inputs,
            delta_softplus,
            positions,
            gap_mode,
            reverse,
            order,
            delta_proj,
        )
        return match_layout(y, u)
    if gap_mode == 'none':
        positions = None
    if impl == 'cuda':
        if delta_proj is not None:
            delta = project_delta(inputs[1], delta_proj)
            inputs = (*inputs[:1], delta, *inputs[2:])
        inputs, positions = to_scan_order(inputs, positions, reverse, order)
        y = _scan_mamba(*inputs, delta_softplus, positions, gap_mode)
        return match_layout(from_scan_order(y, reverse, order), u)
    D, z = inputs[5], inputs[6]
    if u.shape[-1] == 0:
        return match_layout(finish_scan(u.new_zeros(u.shape), u, D, z), u)
    return _kernel_forward(
        *inputs,
        delta_softplus,
        positions,
        gap_mode,
        reverse,
        order,
        False,
        delta_proj,
    )[0]


def _scan_mamba(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, positions, gap_mode
):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    u, delta, B, C = (t.contiguous() for t in (u, delta, B, C))
    z = None if z is None else z.contiguous()
    if positions is None:
        return selective_scan_fn(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus
        )
    u_eff, delta_eff = align_to_dense(
        u, delta, delta_bias, delta_softplus, positions, gap_mode
    )
    y = selective_scan_fn(u_eff, delta_eff, A, B, C)
    return finish_scan(y, u, D, z)


# --------------------------------------------------------------------------
# The compiled CPU kernel (mmssm._ext).
# --------------------------------------------------------------------------
def _kernel_inputs(
    u, delta, A, B, C, D, z, delta_bias, positions, order, delta_proj=None
):
    """The kernel's inputs: one compute dtype, B and C as (batch, K, N)
    with N contiguous (for SIMD), A, D, delta_bias and delta_proj
    contiguous. Other strides are read as they are (no layout copies: the
    kernel reads transposed views)."""
    dtype = compute_dtype(u)

    def prep(t):
        return None if t is None else t.to(dtype)

    def prep_bc(t):
        t = prep(t).transpose(1, 2)
        return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()

    u_, delta_, z_ = prep(u), prep(delta), prep(z)
    A_, D_, bias_, proj_ = (
        None if t is None else prep(t).contiguous()
        for t in (A, D, delta_bias, delta_proj)
    )
    pos = None if positions is None else positions.contiguous()
    order = None if order is None else order.contiguous()
    if proj_ is not None and not hasattr(load_ext(), 'scan_delta_proj'):
        # a build of sources from before the fused projection (an A/B
        # against one): dt_proj's GEMM first, as the models ran it
        warn_once(
            'selective_scan: mmssm._ext was built without the fused '
            'delta_proj (rebuild it); projecting delta with a GEMM first.'
        )
        delta_ = F.linear(delta_.transpose(1, 2), proj_).transpose(1, 2)
        proj_ = None
    B_, C_ = prep_bc(B), prep_bc(C)
    return u_, delta_, A_, B_, C_, D_, z_, bias_, pos, order, proj_


def _kernel_forward(
    u,
    delta,
    A,
    B,
    C,
    D,
    z,
    delta_bias,
    delta_softplus,
    positions,
    gap_mode,
    reverse,
    order,
    checkpoints,
    delta_proj=None,
):
    """The kernel's output and, with ``checkpoints``, the state before
    each chunk (:func:`_checkpoint_shape`; else an empty tensor)."""
    args = _kernel_inputs(
        u, delta, A, B, C, D, z, delta_bias, positions, order, delta_proj
    )
    # (delta_proj only when given: builds without it take the rest)
    proj = {} if args[10] is None else dict(delta_proj=args[10])
    out, ckpt = load_ext().selective_scan_fwd(
        *args[:10],
        delta_softplus,
        _GAP_MODE_IDS[gap_mode],
        reverse,
        checkpoints,
        **proj,
    )
    return match_layout(out.to(u.dtype), u), ckpt


def _checkpoint_shape(
    u: Tensor, A: Tensor, impl: str, checkpoints: bool
) -> Tuple[int, ...]:
    """The shape of the op's second output: the compiled kernel's
    checkpoints (batch, dim, chunks, N) when asked for and the kernel
    runs, (0,) otherwise."""
    if not (checkpoints and impl == 'cpu'):
        return (0,)
    batch, dim, K = u.shape
    return (batch, dim, (K + SCAN_CHUNK - 1) // SCAN_CHUNK, A.shape[1])


@torch.library.custom_op('mmssm::selective_scan_backward', mutates_args=())
def _kernel_backward(
    dout: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    positions: Optional[Tensor],
    gap_mode: str,
    reverse: bool,
    order: Optional[Tensor],
    checkpoints: Optional[Tensor] = None,
    delta_proj: Optional[Tensor] = None,
) -> List[Tensor]:
    """The compiled kernel's backward: the gradients of the inputs that
    are not None, in the order of the arguments, in their dtypes and
    layouts (:func:`empty_layout`). ``checkpoints``: the forward's (the
    kernel then skips the pass that recomputes them), or None. With
    ``delta_proj``, the gradient in the place of ``delta``'s is that of
    the full step sizes ``delta_proj @ delta`` (batch, dim, K),
    tokens-major (:func:`_project_grads` turns it into those of ``delta``
    and ``delta_proj``)."""
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    args = _kernel_inputs(
        *inputs,
        None if gap_mode == 'none' else positions,
        order,
        delta_proj,
    )
    grads = load_ext().selective_scan_bwd(
        *args[:9],
        order=args[9],
        dout=dout.to(args[0].dtype),
        softplus=delta_softplus,
        gap_mode=_GAP_MODE_IDS[gap_mode],
        reverse=reverse,
        checkpoints=checkpoints,
        **({} if args[10] is None else dict(delta_proj=args[10])),
    )
    du, ddelta, dA, dBt, dCt, dD, dz, dbias = grads
    out = (du, ddelta, dA, dBt.transpose(1, 2), dCt.transpose(1, 2), dD, dz)
    out = (*out, dbias)
    like = _grad_likes(inputs, delta_proj)
    return [
        match_layout(g.to(t.dtype), t)
        for g, t in zip(out, like)
        if t is not None
    ]


def _grad_likes(inputs: tuple, delta_proj: Optional[Tensor]) -> tuple:
    """What the kernel's gradients look like: the inputs, but with
    ``delta_proj`` a tokens-major (batch, dim, K) in place of ``delta``
    (the gradient of the full step sizes)."""
    if delta_proj is None:
        return inputs
    u, delta = inputs[:2]
    batch, dim, K = u.shape
    full = delta.new_empty(batch, K, dim).transpose(1, 2)
    return (u, full, *inputs[2:])


@_kernel_backward.register_fake
def _(
    dout,
    u,
    delta,
    A,
    B,
    C,
    D,
    z,
    delta_bias,
    delta_softplus,
    positions,
    gap_mode,
    reverse,
    order,
    checkpoints=None,
    delta_proj=None,
):
    like = _grad_likes((u, delta, A, B, C, D, z, delta_bias), delta_proj)
    return [empty_layout(t) for t in like if t is not None]


def _project_grads(
    ddelta: Tensor, delta: Tensor, delta_proj: Tensor, needs: Tuple[bool, bool]
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The gradients of the low-rank ``delta`` (batch, R, K) and of
    ``delta_proj`` (dim, R) from that of the step sizes ``delta_proj @
    delta``, ``ddelta`` (batch, dim, K), as GEMMs over the tokens-major
    layouts: ``d delta = delta_proj^T ddelta`` and ``d delta_proj`` the sum
    over batch and K of ``ddelta delta^T``."""
    dtype = ddelta.dtype
    dfull = ddelta.transpose(1, 2)  # (batch, K, dim)
    d_low = d_proj = None
    if needs[0]:
        d_low = torch.matmul(dfull, delta_proj.to(dtype)).transpose(1, 2)
        d_low = match_layout(d_low.to(delta.dtype), delta)
    if needs[1]:
        low = delta.to(dtype).transpose(1, 2).reshape(-1, delta.shape[1])
        dim = ddelta.shape[1]
        d_proj = dfull.reshape(-1, dim).t().mm(low).to(delta_proj.dtype)
    return d_low, d_proj


# --------------------------------------------------------------------------
# The custom op.
# --------------------------------------------------------------------------
@torch.library.custom_op('mmssm::selective_scan', mutates_args=())
def _selective_scan_op(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    positions: Optional[Tensor],
    gap_mode: str,
    impl: str,
    reverse: bool = False,
    order: Optional[Tensor] = None,
    checkpoints: bool = False,
    delta_proj: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """The scan on checked inputs (positions None or (batch, K), order
    None or (batch or 1, K), delta_proj None or (dim, R) with delta then
    (batch, R, K)), and the compiled kernel's checkpoints for its backward
    when ``checkpoints`` (:func:`_checkpoint_shape`)."""
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    impl = _resolve_impl(impl, u)
    shape = _checkpoint_shape(u, A, impl, checkpoints)
    if len(shape) == 4 and u.shape[-1] > 0:
        pos = None if gap_mode == 'none' else positions
        return _kernel_forward(
            *inputs,
            delta_softplus,
            pos,
            gap_mode,
            reverse,
            order,
            True,
            delta_proj,
        )
    y = _run(
        impl,
        inputs,
        delta_softplus,
        positions,
        gap_mode,
        reverse,
        order,
        delta_proj,
    )
    return y, u.new_empty(shape, dtype=compute_dtype(u))


@_selective_scan_op.register_fake
def _(
    u,
    delta,
    A,
    B,
    C,
    D,
    z,
    delta_bias,
    delta_softplus,
    positions,
    gap_mode,
    impl,
    reverse=False,
    order=None,
    checkpoints=False,
    delta_proj=None,
):
    shape = _checkpoint_shape(u, A, _resolve_impl(impl, u), checkpoints)
    return empty_layout(u), u.new_empty(shape, dtype=compute_dtype(u))


def _setup_context(ctx, inputs, output):
    tensors = inputs[: len(_NAMES)]
    delta_softplus, positions, gap_mode, impl, reverse, order = inputs[
        len(_NAMES) : len(_NAMES) + 6
    ]
    delta_proj = inputs[15] if len(inputs) > 15 else None
    ckpt = output[1]
    ctx.mark_non_differentiable(ckpt)
    ckpt = ckpt if ckpt.dim() == 4 else None
    ctx.save_for_backward(*tensors, delta_proj, positions, order, ckpt)
    ctx.config = (
        delta_softplus,
        gap_mode,
        _resolve_impl(impl, tensors[0]),
        reverse,
    )


def _backward(ctx, dout, dckpt):
    *tensors, delta_proj, positions, order, ckpt = ctx.saved_tensors
    delta_softplus, gap_mode, impl, reverse = ctx.config
    needs = ctx.needs_input_grad[: len(_NAMES)]
    need_proj = len(ctx.needs_input_grad) > 15 and ctx.needs_input_grad[15]
    d_proj = None
    if impl == 'cpu' and tensors[0].shape[-1] > 0:
        grads = iter(
            _kernel_backward(
                dout,
                *tensors,
                delta_softplus,
                positions,
                gap_mode,
                reverse,
                order,
                ckpt,
                delta_proj,
            )
        )
        out = [None if t is None else next(grads) for t in tensors]
        if delta_proj is not None:  # out[1]: d of delta_proj @ delta
            out[1], d_proj = _project_grads(
                out[1], tensors[1], delta_proj, (needs[1], need_proj)
            )
    else:  # the PyTorch (or mamba-ssm) forward again, with autograd
        with torch.enable_grad():
            leaves = [
                t.detach().requires_grad_(need) if t is not None else None
                for t, need in zip((*tensors, delta_proj), (*needs, need_proj))
            ]
            y = _run(
                impl,
                tuple(leaves[:-1]),
                delta_softplus,
                positions,
                gap_mode,
                reverse,
                order,
                leaves[-1],
            )
            wanted = [
                t for t, need in zip(leaves, (*needs, need_proj)) if need
            ]
            grads = iter(torch.autograd.grad(y, wanted, dout))
        out = [next(grads) if need else None for need in needs]
        d_proj = next(grads) if need_proj else None
    return (*out, None, None, None, None, None, None, None, d_proj)


_selective_scan_op.register_autograd(_backward, setup_context=_setup_context)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    positions: Optional[Tensor] = None,
    gap_mode: str = 'prev',
    impl: str = 'auto',
    reverse: bool = False,
    order: Optional[Tensor] = None,
    delta_proj: Optional[Tensor] = None,
) -> Tensor:
    """Selective scan over K tokens that may be a pruned subset.

    Args:
        u (Tensor): Inputs, (batch, dim, K).
        delta (Tensor): Step sizes before bias/softplus, (batch, dim, K);
            with ``delta_proj``, their low-rank input (batch, R, K).
        A (Tensor): State matrix (negative), (dim, N).
        B (Tensor): Input projections, (batch, N, K).
        C (Tensor): Output projections, (batch, N, K).
        D (Tensor, optional): Skip weights, (dim, ). Defaults to None.
        z (Tensor, optional): Gate, ``y * silu(z)``, (batch, dim, K).
            Defaults to None.
        delta_bias (Tensor, optional): Added to delta, (dim, ).
            Defaults to None.
        delta_softplus (bool): Apply softplus to ``delta + delta_bias``.
            Defaults to False.
        positions (Tensor, optional): int64 (K, ) or (batch, K), strictly
            increasing original scan positions of the K tokens. None means
            dense (0..K-1). Defaults to None.
        gap_mode (str): 'prev' (a pruned step repeats the previous kept
            token's transition), 'null' (a pruned step is a zero-input
            token) or 'none' (no alignment); see docs/scan.md.
            Defaults to 'prev'.
        impl (str): 'auto', 'ref', 'chunked', 'cpu' or 'cuda'. The
            environment variable ``MMSSM_SCAN_IMPL`` overrides 'auto'.
            Defaults to 'auto'.
        reverse (bool): Scan from the last token to the first (the
            backward direction of a bidirectional model, without flipped
            copies). ``positions`` stay the tokens' positions (increasing
            along K); a token's gap is then the one to the token after it.
            Defaults to False.
        order (Tensor, optional): int64 (K, ) or (batch or 1, K), a
            permutation: scan step s reads ``u`` and ``z`` at token
            ``order[s]`` and writes its output there, while ``delta``,
            ``B``, ``C`` (and ``positions``) are per step (PlainMamba's
            zig-zag scans, whose step inputs come from the raster token,
            without gathered copies). Not with ``reverse``.
            Defaults to None.
        delta_proj (Tensor, optional): (dim, R): the step sizes are
            ``delta_proj @ delta`` (mamba-ssm's ``dt_proj`` weight; its
            bias is ``delta_bias``), computed inside the compiled kernel
            (fused: no (batch, dim, K) step sizes in the forward) and by
            the PyTorch implementations before their scan.
            Defaults to None.

    Any strides are accepted: the compiled kernel reads (batch, dim, K)
    views of (batch, K, dim) tensors (a Linear layer's output) in place,
    and its output is then in that layout too (the transpose of a
    contiguous (batch, K, dim) tensor).

    Returns:
        Tensor: (batch, dim, K), in the dtype of ``u``.
    """
    if impl not in IMPLS:
        raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')
    positions = check_scan_inputs(
        u, delta, A, B, C, D, z, delta_bias, positions, gap_mode, delta_proj
    )
    if order is not None:
        if reverse:
            raise ValueError('order and reverse are exclusive')
        order = check_order(order, u)
    # the kernel's forward keeps its chunk checkpoints for the backward
    # only when there will be one
    checkpoints = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (u, delta, A, B, C, D, z, delta_bias, delta_proj)
    )
    return _selective_scan_op(
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        bool(delta_softplus),
        positions,
        gap_mode,
        impl,
        bool(reverse),
        order,
        checkpoints,
        delta_proj,
    )[0]
