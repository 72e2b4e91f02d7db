"""Depthwise causal conv1d, optionally position-aware (Vim's ``conv1d``).

For ``K`` kept tokens at strictly increasing positions ``p_0 < ... <
p_{K-1}`` (per batch row) of a sequence of length ``L``, weight ``w`` (E, k)
and bias ``b`` (E), the position-aware conv is the dense causal conv over
the full length with zeros at the pruned positions, read at the kept ones::

    out[:, e, i] = b[e] + sum_{t = 0..min(k-1, i), d <= k-1}
                   w[e, k-1-d] * x[:, e, i-t],    d = p_i - p_{i-t}

then optionally ``silu``. With ``positions=None``, ``p_i = i``: the plain
causal conv (left padding ``k - 1``) over the K tokens.

Implementations, one signature (:func:`causal_conv1d` chooses):

* ``'ref'``: :func:`causal_conv1d_ref`, the scatter / conv / gather
  formulation in PyTorch; the ground truth (float64-capable, any device).
* ``'cpu'``: the compiled kernel ``mmssm._ext`` (``kernels/causal_conv1d``),
  which reads the positions natively and fuses the SiLU, forward and
  backward.

:func:`causal_conv1d` takes part in ``__torch_function__`` dispatch, as
``torch.nn.functional`` does: a ``TorchFunctionMode`` (such as
:func:`mmssm.utils.count_flops`) sees one call of the op, whichever
implementation then runs, and not the operations inside it.
"""

import importlib
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function

from .selective_scan import (
    _compute_dtype,
    _cpu_kernel_skip_reason,
    _warn_once,
    check_float_tensors,
    check_positions,
)

IMPLS = ('auto', 'ref', 'cpu')
ACTIVATIONS = (None, 'silu')


# the module (mmssm.ops.selective_scan is the function of the same name)
_scan_module = importlib.import_module('.selective_scan', __package__)


def _ext_module():
    """``mmssm._ext`` or None, looked up on each call (tests patch it)."""
    return _scan_module._ext


# --------------------------------------------------------------------------
# Input checks, shared by every implementation.
# --------------------------------------------------------------------------
def _check_inputs(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    positions: Optional[Tensor],
    seq_len: Optional[int],
    activation: Optional[str],
) -> Tuple[Tensor, Optional[Tensor], Optional[int]]:
    """Validate the arguments.

    Returns:
        tuple: ``weight`` as (E, k), ``positions`` as int64 (batch, K) or
        None, and ``seq_len`` (``positions.max() + 1`` when not given).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(
            f'activation must be one of {ACTIVATIONS}, got {activation!r}'
        )
    check_float_tensors(dict(x=x, weight=weight, bias=bias))
    if x.dim() != 3:
        raise ValueError(f'x must be (batch, E, K), got {tuple(x.shape)}')
    batch, E, K = x.shape
    if weight.dim() == 3 and weight.shape[1] == 1:  # nn.Conv1d's layout
        weight = weight[:, 0]
    if weight.dim() != 2 or weight.shape[0] != E or weight.shape[1] < 1:
        raise ValueError(
            f'weight must be (E={E}, k) or (E={E}, 1, k), got '
            f'{tuple(weight.shape)}'
        )
    if bias is not None and tuple(bias.shape) != (E,):
        raise ValueError(
            f'bias must have shape ({E},), got {tuple(bias.shape)}'
        )
    if seq_len is not None and (
        isinstance(seq_len, bool) or not isinstance(seq_len, int)
    ):
        raise ValueError(f'seq_len must be an int, got {seq_len!r}')
    if positions is None:
        if seq_len is not None and seq_len != K:
            raise ValueError(
                f'seq_len={seq_len} without positions must equal K={K}'
            )
        return weight, None, seq_len
    positions = check_positions(positions, x, 'x')
    if K == 0 or batch == 0:
        return weight, positions, 0 if seq_len is None else seq_len
    last = int(positions[:, -1].max())
    if seq_len is None:
        seq_len = last + 1
    elif last >= seq_len:
        raise ValueError(f'positions reach {last}, beyond seq_len={seq_len}')
    return weight, positions, seq_len


# --------------------------------------------------------------------------
# The PyTorch reference.
# --------------------------------------------------------------------------
def _dense_causal(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Depthwise conv of ``x`` padded by ``k - 1`` on the left.

    float64 uses a sum of shifted products: PyTorch's float64 depthwise
    convolution on the CPU runs one slow kernel per channel.
    """
    k = weight.shape[-1]
    xp = F.pad(x, (k - 1, 0))
    if x.dtype != torch.float64:
        return F.conv1d(xp, weight[:, None], bias, groups=weight.shape[0])
    L = x.shape[-1]
    out = weight[:, :1] * xp[..., :L]
    for j in range(1, k):
        out = out + weight[:, j : j + 1] * xp[..., j : j + L]
    return out if bias is None else out + bias[:, None]


def causal_conv1d_ref(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    positions: Optional[Tensor] = None,
    seq_len: Optional[int] = None,
    activation: Optional[str] = None,
) -> Tensor:
    """The position-aware causal conv by scatter / conv / gather.

    The K tokens are scattered to their positions in a zero (batch, E,
    seq_len) tensor, the dense causal conv runs over the full length and the
    K positions are read back. See :func:`causal_conv1d` for the arguments.
    """
    weight, positions, seq_len = _check_inputs(
        x, weight, bias, positions, seq_len, activation
    )
    if positions is None:
        out = _dense_causal(x, weight, bias)
    else:
        B, E, K = x.shape
        index = positions[:, None, :].expand(B, E, K)
        full = x.new_zeros(B, E, seq_len).scatter(2, index, x)
        out = _dense_causal(full, weight, bias).gather(2, index)
    return F.silu(out) if activation == 'silu' else out


# --------------------------------------------------------------------------
# The compiled CPU kernel.
# --------------------------------------------------------------------------
class CausalConv1dFn(torch.autograd.Function):
    """Autograd wrapper of ``mmssm._ext.causal_conv1d_fwd`` / ``_bwd``.

    Inputs are already checked; ``weight`` is (E, k) and ``positions`` is
    int64 (batch, K) or None.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, positions, silu):
        ext = _ext_module()
        dtype = _compute_dtype(x)
        dtypes = [None if t is None else t.dtype for t in (x, weight, bias)]

        def prep(t):
            return None if t is None else t.to(dtype).contiguous()

        x_, w_, b_ = prep(x), prep(weight), prep(bias)
        pos = None if positions is None else positions.contiguous()
        out = ext.causal_conv1d_fwd(x_, w_, b_, pos, silu)
        ctx.save_for_backward(x_, w_, b_, pos)
        ctx.config = (silu, dtypes)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, dout):
        x, w, b, pos = ctx.saved_tensors
        silu, dtypes = ctx.config
        dout = dout.to(x.dtype).contiguous()
        grads = _ext_module().causal_conv1d_bwd(x, w, b, pos, dout, silu)
        dx, dw, db = (
            None if g is None or dt is None else g.to(dt)
            for g, dt in zip(grads, dtypes)
        )
        return dx, dw, db, None, None


def _conv_kernel_skip_reason(x: Tensor) -> str:
    reason = _cpu_kernel_skip_reason(x)
    if not reason and not hasattr(_ext_module(), 'causal_conv1d_fwd'):
        reason = (
            'mmssm._ext was built without the causal conv1d kernel '
            '(rebuild it)'
        )
    return reason


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    positions: Optional[Tensor] = None,
    seq_len: Optional[int] = None,
    activation: Optional[str] = None,
    impl: str = 'auto',
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

    Returns:
        Tensor: (batch, E, K), in the dtype of ``x``.
    """
    tensors = tuple(t for t in (x, weight, bias, positions) if t is not None)
    if has_torch_function(tensors):
        return handle_torch_function(
            causal_conv1d,
            tensors,
            x,
            weight,
            bias=bias,
            positions=positions,
            seq_len=seq_len,
            activation=activation,
            impl=impl,
        )
    if impl not in IMPLS:
        raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')
    if impl == 'auto':
        impl = os.environ.get('MMSSM_CONV_IMPL', 'auto')
        if impl not in IMPLS:
            raise ValueError(
                f'MMSSM_CONV_IMPL must be one of {IMPLS}, got {impl!r}'
            )
    if impl == 'auto':
        impl = 'ref'  # on other devices than the CPU: PyTorch's conv
        if x.device.type == 'cpu':
            reason = _conv_kernel_skip_reason(x)
            if reason:
                _warn_once(
                    f'causal_conv1d: {reason}; using the PyTorch '
                    "'ref' conv instead (slower)."
                )
            else:
                impl = 'cpu'
    if impl == 'ref':
        return causal_conv1d_ref(
            x, weight, bias, positions, seq_len, activation
        )
    weight, positions, _ = _check_inputs(
        x, weight, bias, positions, seq_len, activation
    )
    reason = _conv_kernel_skip_reason(x)
    if reason:
        raise RuntimeError(f"causal_conv1d impl='cpu': {reason}")
    return CausalConv1dFn.apply(
        x, weight, bias, positions, activation == 'silu'
    )
