"""Depthwise causal conv1d, optionally position-aware: the dispatcher.

:func:`causal_conv1d` (Vim's ``conv1d`` over the kept tokens) checks its
arguments and calls the custom op ``torch.ops.mmssm.causal_conv1d``, which
runs the PyTorch reference ('ref') or the compiled kernel ('cpu') and has a
fake (meta) implementation and a FLOP formula. With positions, the conv is
the dense causal conv over the full length with zeros at the pruned
positions, read at the kept ones (docs/scan.md).
"""

import os
from typing import List, Optional

import torch
from torch import Tensor

from .checks import check_conv_inputs, empty_layout, match_layout
from .ext import cpu_kernel_skip_reason, load_ext, warn_once
from .reference import compute_dtype, conv_unchecked

__all__ = ['IMPLS', 'causal_conv1d']

IMPLS = ('auto', 'ref', 'cpu')


def _cpu_skip_reason(x: Tensor) -> str:
    return cpu_kernel_skip_reason(x, 'causal_conv1d_fwd', 'causal conv1d')


def _resolve_impl(impl: str, x: Tensor) -> str:
    """The implementation that runs: 'auto' resolved, availability checked.

    Called by the op when it runs and again when its gradient is set up, so
    that the backward pass runs the same implementation as the forward.
    """
    if x.device.type == 'meta':  # shapes only: the kernel's backward
        return 'cpu'  # op has a fake implementation, which gives them
    if impl == 'auto':
        impl = os.environ.get('MMSSM_CONV_IMPL', 'auto')
        if impl not in IMPLS:
            raise ValueError(
                f'MMSSM_CONV_IMPL must be one of {IMPLS}, got {impl!r}'
            )
    if impl == 'auto':
        impl = 'ref'  # on other devices than the CPU: PyTorch's conv
        if x.device.type == 'cpu':
            reason = _cpu_skip_reason(x)
            if reason:
                warn_once(
                    f'causal_conv1d: {reason}; using the PyTorch '
                    "'ref' conv instead (slower)."
                )
            else:
                impl = 'cpu'
    elif impl == 'cpu':
        reason = _cpu_skip_reason(x)
        if reason:
            raise RuntimeError(f"causal_conv1d impl='cpu': {reason}")
    return impl


def _kernel_inputs(x, weight, bias, positions):
    """One compute dtype; ``x`` in any layout (the kernel reads strides)."""
    dtype = compute_dtype(x)

    def prep(t):
        return None if t is None else t.to(dtype).contiguous()

    pos = None if positions is None else positions.contiguous()
    return x.to(dtype), prep(weight), prep(bias), pos


@torch.library.custom_op('mmssm::causal_conv1d_backward', mutates_args=())
def _kernel_backward(
    dout: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    positions: Optional[Tensor],
    silu: bool,
    reverse: bool,
) -> List[Tensor]:
    """The compiled kernel's backward: dx, dweight and (with a bias)
    dbias, in the inputs' dtypes (dx in the layout of x)."""
    args = _kernel_inputs(x, weight, bias, positions)
    dout = dout.to(args[0].dtype)
    grads = load_ext().causal_conv1d_bwd(*args, dout, silu, reverse)
    inputs = (x, weight, bias)
    return [
        match_layout(g.to(t.dtype), t)
        for g, t in zip(grads, inputs)
        if t is not None
    ]


@_kernel_backward.register_fake
def _(dout, x, weight, bias, *args):
    return [empty_layout(t) for t in (x, weight, bias) if t is not None]


@torch.library.custom_op('mmssm::causal_conv1d', mutates_args=())
def _causal_conv1d_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    positions: Optional[Tensor],
    seq_len: Optional[int],
    silu: bool,
    impl: str,
    reverse: bool = False,
) -> Tensor:
    """The conv on checked inputs: weight (E, k), positions None or
    (batch, K); the output in the layout of x (:func:`empty_layout`)."""
    if _resolve_impl(impl, x) == 'ref':
        out = conv_unchecked(
            x, weight, bias, positions, seq_len, silu, reverse
        )
        return match_layout(out, x)
    args = _kernel_inputs(x, weight, bias, positions)
    out = load_ext().causal_conv1d_fwd(*args, silu, reverse)
    return match_layout(out.to(x.dtype), x)


@_causal_conv1d_op.register_fake
def _(x, *args, **kwargs):
    return empty_layout(x)


def _setup_context(ctx, inputs, output):
    x, weight, bias, positions, seq_len, silu, impl, reverse = inputs
    ctx.save_for_backward(x, weight, bias, positions)
    ctx.config = (seq_len, silu, _resolve_impl(impl, x), reverse)


def _backward(ctx, dout):
    x, weight, bias, positions = ctx.saved_tensors
    seq_len, silu, impl, reverse = ctx.config
    tensors = (x, weight, bias)
    needs = ctx.needs_input_grad[:3]
    if impl == 'cpu':
        grads = iter(
            _kernel_backward(dout, x, weight, bias, positions, silu, reverse)
        )
        out = [None if t is None else next(grads) for t in tensors]
    else:  # the reference again, with autograd
        with torch.enable_grad():
            leaves = [
                t.detach().requires_grad_(need) if t is not None else None
                for t, need in zip(tensors, needs)
            ]
            y = conv_unchecked(*leaves, positions, seq_len, silu, reverse)
            wanted = [t for t, need in zip(leaves, needs) if need]
            grads = iter(torch.autograd.grad(y, wanted, dout))
        out = [next(grads) if need else None for need in needs]
    return (*out, None, None, None, None, None)


_causal_conv1d_op.register_autograd(_backward, setup_context=_setup_context)


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    positions: Optional[Tensor] = None,
    seq_len: Optional[int] = None,
    activation: Optional[str] = None,
    impl: str = 'auto',
    reverse: bool = False,
) -> Tensor:
    """Depthwise causal conv1d over K tokens that may be a pruned subset.

    Args:
        x (Tensor): The tokens, (batch, E, K).
        weight (Tensor): (E, k), or nn.Conv1d's depthwise (E, 1, k).
        bias (Tensor, optional): (E, ). Defaults to None.
        positions (Tensor, optional): int64 (K, ) or (batch, K), the
            strictly increasing original positions of the K tokens; the conv
            sees zeros at the missing positions. None: the K tokens are the
            whole sequence. Defaults to None.
        seq_len (int, optional): The full length L (> every position); the
            result does not depend on it. Defaults to ``positions.max() +
            1``; without positions it must be None or K. Defaults to None.
        activation (str, optional): None or 'silu', applied to the output
            (fused in the kernel). Defaults to None.
        impl (str): 'auto', 'ref' or 'cpu'. 'auto' is 'cpu' for CPU tensors
            when the kernel is built (with a warning if it is not) and 'ref'
            for other devices; the environment variable ``MMSSM_CONV_IMPL``
            overrides it. Defaults to 'auto'.
        reverse (bool): The anti-causal conv (taps on the following
            tokens): the causal conv of the reversed sequence, reversed
            back, without flipped copies (Vim's backward direction).
            Defaults to False.

    ``x`` may have any strides (the kernel reads a (batch, E, K) view of a
    (batch, K, E) tensor in place and then writes its output in that
    layout).

    Returns:
        Tensor: (batch, E, K), in the dtype of ``x``.
    """
    if impl not in IMPLS:
        raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')
    weight_2d, positions, seq_len = check_conv_inputs(
        x, weight, bias, positions, seq_len, activation
    )
    # the (E, 1, k) -> (E, k) view stays outside the op, so that autograd
    # returns the weight's gradient in the weight's own layout
    return _causal_conv1d_op(
        x,
        weight_2d,
        bias,
        positions,
        seq_len,
        activation == 'silu',
        impl,
        bool(reverse),
    )
