"""The ops in plain PyTorch: the references and the fallbacks.

:func:`selective_scan_ref` (a sequential loop, float64-capable: the ground
truth), :func:`selective_scan_chunked` (a parallel scan, the fallback when
the compiled kernel is missing), :func:`align_to_dense` (the aligned scan as
an ordinary selective scan, for mamba-ssm's kernel) and
:func:`causal_conv1d_ref` (the position-aware causal conv by scatter, conv,
gather). The math is in docs/scan.md. The public functions check their
arguments; the ``*_unchecked`` ones are what the custom ops run.
"""

from functools import partial
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import (
    GAP_MODES,
    check_conv_inputs,
    check_order,
    check_scan_inputs,
)

# (u, delta, decay_delta, A, B, C) -> C_k . h_k, (batch, dim, K)
Recurrence = Callable[..., Tensor]


# --------------------------------------------------------------------------
# Selective scan.
# --------------------------------------------------------------------------
def gaps_of(positions: Tensor) -> Tensor:
    """Pruned tokens before each kept token; the leading gap counts 0.

    ``h_0 = 0``, so a leading gap changes nothing.
    """
    return positions.diff(dim=-1, prepend=positions[:, :1] - 1) - 1


def _prepare_delta(
    delta: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool
) -> Tensor:
    if delta_bias is not None:
        delta = delta + delta_bias[..., None]
    return F.softplus(delta) if delta_softplus else delta


def _effective_delta(
    delta: Tensor,
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    gaps: Optional[Tensor],
    gap_mode: str,
) -> Tensor:
    """``delta_k + g_k * gap_delta_k``: the exponent of the step's decay."""
    if gaps is None or gap_mode == 'none':
        return delta
    gaps = gaps[:, None, :].to(delta.dtype)
    if gap_mode == 'prev':
        gap_delta = F.pad(delta[..., :-1], (1, 0))
    else:  # 'null': a token with zero input
        if delta_bias is None:
            gap_delta = delta.new_zeros(delta.shape[1])
        else:
            gap_delta = delta_bias.to(delta.dtype)
        if delta_softplus:
            gap_delta = F.softplus(gap_delta)
        gap_delta = gap_delta[:, None]
    return delta + gaps * gap_delta


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other float type."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def finish_scan(
    y: Tensor, u: Tensor, D: Optional[Tensor], z: Optional[Tensor]
) -> Tensor:
    """Add the skip ``D u`` and apply the gate ``silu(z)``."""
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y


def selective_scan_ref(
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
    reverse: bool = False,
    order: Optional[Tensor] = None,
    delta_proj: Optional[Tensor] = None,
) -> Tensor:
    """The aligned selective scan as a plain sequential loop: the reference.

    Computes in float64 for float64 ``u`` and in float32 otherwise. A
    reversed scan runs on flipped copies, an ordered one on gathered copies
    (:func:`to_scan_order`); with ``delta_proj``, the step sizes are
    projected first (:func:`project_delta`). See
    :func:`mmssm.ops.selective_scan` for the arguments.
    """
    positions = check_scan_inputs(
        u, delta, A, B, C, D, z, delta_bias, positions, gap_mode, delta_proj
    )
    order = _check_order_args(u, reverse, order)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    return scan_unchecked(
        recurrence_loop,
        inputs,
        delta_softplus,
        positions,
        gap_mode,
        reverse,
        order,
        delta_proj,
    )


def _check_order_args(
    u: Tensor, reverse: bool, order: Optional[Tensor]
) -> Optional[Tensor]:
    if order is None:
        return None
    if reverse:
        raise ValueError('order and reverse are exclusive')
    return check_order(order, u)


def to_scan_order(
    inputs: tuple,
    positions: Optional[Tensor],
    reverse: bool,
    order: Optional[Tensor],
) -> Tuple[tuple, Optional[Tensor]]:
    """The inputs of a reversed or ordered scan as those of a plain one.

    Reversed: every per-token input flipped, and the positions mirrored
    (``p_last - flip(p)``: the same gaps, now before each token in scan
    order). Ordered: ``u`` and ``z`` gathered at ``order`` (delta, B, C and
    the positions are per step already). :func:`from_scan_order` maps the
    output back.
    """
    u, delta, A, B, C, D, z, delta_bias = inputs
    if reverse:
        u, delta, B, C = (t.flip(-1) for t in (u, delta, B, C))
        z = None if z is None else z.flip(-1)
        if positions is not None:
            positions = positions[:, -1:] - positions.flip(-1)
    elif order is not None:
        index = order[:, None].expand(u.shape[0], u.shape[1], -1)
        u = u.gather(2, index)
        z = None if z is None else z.gather(2, index)
    return (u, delta, A, B, C, D, z, delta_bias), positions


def from_scan_order(
    y: Tensor, reverse: bool, order: Optional[Tensor]
) -> Tensor:
    """A plain scan's output (scan order) back in token order."""
    if reverse:
        return y.flip(-1)
    if order is not None:
        index = order[:, None].expand(y.shape[0], y.shape[1], -1)
        return torch.empty_like(y).scatter(2, index, y)
    return y


def selective_scan_chunked(
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
    chunk_size: int = 32,
    reverse: bool = False,
    order: Optional[Tensor] = None,
    delta_proj: Optional[Tensor] = None,
) -> Tensor:
    """The aligned selective scan as a parallel scan in PyTorch.

    Inside chunks of ``chunk_size`` tokens the linear recurrence is an
    inclusive Hillis-Steele scan of ``(decay, input)`` pairs (only products
    of decays <= 1, so it is stable in float32); the chunks' final states are
    then carried across sequentially. Materialises (batch, dim, K, N).
    """
    positions = check_scan_inputs(
        u, delta, A, B, C, D, z, delta_bias, positions, gap_mode, delta_proj
    )
    order = _check_order_args(u, reverse, order)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    return scan_unchecked(
        partial(recurrence_chunked, chunk_size=chunk_size),
        inputs,
        delta_softplus,
        positions,
        gap_mode,
        reverse,
        order,
        delta_proj,
    )


def project_delta(delta: Tensor, delta_proj: Tensor) -> Tensor:
    """The step sizes ``delta_proj @ delta`` (batch, dim, K) of a low-rank
    ``delta`` (batch, R, K) and ``delta_proj`` (dim, R): what the compiled
    kernel computes in its preparation pass (mamba-ssm's ``dt_proj``
    without its bias, which is the scan's ``delta_bias``)."""
    # (matmul: einsum's backward does not trace with other strides under
    # torch.compile's dynamic shapes)
    return torch.matmul(delta_proj.to(delta.dtype), delta)


def scan_unchecked(
    recurrence: Recurrence,
    inputs: tuple,
    delta_softplus: bool,
    positions: Optional[Tensor],
    gap_mode: str,
    reverse: bool = False,
    order: Optional[Tensor] = None,
    delta_proj: Optional[Tensor] = None,
) -> Tensor:
    """Prepare checked inputs, run ``recurrence``, add D and the gate.

    ``inputs`` are ``(u, delta, A, B, C, D, z, delta_bias)``; ``positions``
    is None or (batch, K); ``order`` None or (batch or 1, K);
    ``delta_proj`` None or (dim, R), ``delta`` then (batch, R, K).
    ``recurrence(u, delta, decay_delta, A, B, C)`` returns ``C_k . h_k``
    (batch, dim, K) for the softplus'd steps ``delta`` and the exponents
    ``decay_delta`` of the steps' decays (gaps included).
    """
    if reverse or order is not None:
        inputs, positions = to_scan_order(inputs, positions, reverse, order)
        y = scan_unchecked(
            recurrence,
            inputs,
            delta_softplus,
            positions,
            gap_mode,
            delta_proj=delta_proj,
        )
        return from_scan_order(y, reverse, order)
    u, delta, A, B, C, D, z, delta_bias = inputs
    out_dtype = u.dtype
    dtype = compute_dtype(u)
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    D, z, delta_bias = (
        None if t is None else t.to(dtype) for t in (D, z, delta_bias)
    )
    if delta_proj is not None:
        delta = project_delta(delta, delta_proj.to(dtype))
    gaps = None if positions is None else gaps_of(positions)
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    decay_delta = _effective_delta(
        delta, delta_bias, delta_softplus, gaps, gap_mode
    )
    if u.shape[-1] == 0:
        y = u.new_zeros(u.shape)
    else:
        y = recurrence(u, delta, decay_delta, A, B, C)
    return finish_scan(y, u, D, z).to(out_dtype)


def recurrence_loop(u, delta, decay_delta, A, B, C) -> Tensor:
    """One step at a time: the ground truth."""
    batch, dim, K = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for k in range(K):
        decay = torch.exp(decay_delta[:, :, k, None] * A)
        h = (
            decay * h
            + (delta[:, :, k] * u[:, :, k])[..., None] * B[:, None, :, k]
        )
        ys.append(torch.einsum('bdn,bn->bd', h, C[:, :, k]))
    return torch.stack(ys, dim=-1)


def recurrence_chunked(
    u, delta, decay_delta, A, B, C, chunk_size: int = 32
) -> Tensor:
    """Hillis-Steele scans inside chunks, a loop across them."""
    batch, dim, K = u.shape
    N = A.shape[1]
    T = min(chunk_size, K)
    pad = (-K) % T
    decay = torch.exp(decay_delta[..., None] * A[:, None, :])
    x = (delta * u)[..., None] * B.transpose(1, 2)[:, None]
    if pad:  # identity steps: decay 1, input 0
        decay = F.pad(decay, (0, 0, 0, pad), value=1.0)
        x = F.pad(x, (0, 0, 0, pad))
    num_chunks = (K + pad) // T
    decay = decay.view(batch, dim, num_chunks, T, N)
    x = x.view(batch, dim, num_chunks, T, N)
    step = 1
    while step < T:  # within chunks: x = local state, decay = cumulative
        x = torch.cat(
            [
                x[:, :, :, :step],
                decay[:, :, :, step:] * x[:, :, :, :-step] + x[:, :, :, step:],
            ],
            dim=3,
        )
        decay = torch.cat(
            [
                decay[:, :, :, :step],
                decay[:, :, :, step:] * decay[:, :, :, :-step],
            ],
            dim=3,
        )
        step *= 2
    carry = x.new_zeros(batch, dim, N)
    carries = []
    for c in range(num_chunks):  # across chunks: the state entering chunk c
        carries.append(carry)
        carry = decay[:, :, c, -1] * carry + x[:, :, c, -1]
    h = x + decay * torch.stack(carries, dim=2)[:, :, :, None]
    h = h.view(batch, dim, num_chunks * T, N)[:, :, :K]
    return torch.einsum('bdkn,bnk->bdk', h, C)


def masked_delta(
    delta: Tensor,
    step_mask: Tensor,
    gap_mode: str,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    reverse: bool = False,
) -> Tensor:
    """The steps of a full-length scan whose masked steps are pruned tokens.

    A scan of all L steps, in which the masked steps have zero input
    (``u``, ``B`` and ``C`` zeroed by the caller) and these step sizes,
    equals the aligned scan of the kept steps at their positions, read at
    the kept steps (docs/scan.md): a masked step takes ``softplus(bias)``
    for 'null' (a zero-input token), the step of the last kept step before
    it for 'prev' (0 before the first: the state is still zero there) and
    0 for 'none' (the state passes unchanged: the compact scan). Run the
    scan on the result with ``delta_bias=None, delta_softplus=False``.

    Args:
        delta (Tensor): (batch, dim, L) raw steps, as the scan's ``delta``.
        step_mask (Tensor): (batch, L), 1 (or True) at the kept steps and
            0 at the masked ones.
        gap_mode (str): 'prev', 'null' or 'none'.
        delta_bias (Tensor, optional): (dim, ). Defaults to None.
        delta_softplus (bool): Defaults to False.
        reverse (bool): For a reversed scan ('prev' then takes the step of
            the next kept token). Defaults to False.

    Returns:
        Tensor: (batch, dim, L), the steps with bias and softplus applied.
    """
    if reverse and gap_mode == 'prev':
        return masked_delta(
            delta.flip(-1),
            step_mask.flip(-1),
            gap_mode,
            delta_bias,
            delta_softplus,
        ).flip(-1)
    if gap_mode not in GAP_MODES:
        raise ValueError(
            f'gap_mode must be one of {GAP_MODES}, got {gap_mode!r}'
        )
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    keep = step_mask.to(torch.bool)[:, None, :]
    if gap_mode == 'null':
        gap = _effective_delta(
            delta.new_zeros(1, delta.shape[1], 1),
            delta_bias,
            delta_softplus,
            delta.new_ones(1, 1),
            'null',
        )
    elif gap_mode == 'prev':  # the last kept step at or before each step
        steps = torch.arange(delta.shape[-1], device=delta.device)
        last = torch.where(keep[:, 0], steps, -1).cummax(dim=-1).values
        gap = (
            delta.gather(2, last.clamp_min(0)[:, None].expand_as(delta))
            * (last >= 0)[:, None]
        )
    else:
        gap = delta.new_zeros(())
    return torch.where(keep, delta, gap)


def align_to_dense(
    u: Tensor,
    delta: Tensor,
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    positions: Optional[Tensor],
    gap_mode: str,
) -> Tuple[Tensor, Tensor]:
    """Reparametrise the aligned scan as an ordinary selective scan.

    With ``delta'_k = delta_k + g_k gap_delta_k`` and ``u'_k = u_k delta_k /
    delta'_k``, the ordinary scan of ``(u', delta')`` (no bias, no softplus,
    no ``D``) equals the aligned scan of ``(u, delta)`` without its ``D u``
    term. This lets any standard kernel, mamba-ssm's included, run it.
    ``positions`` must already be (batch, K).
    """
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    gaps = None if positions is None else gaps_of(positions)
    eff = _effective_delta(delta, delta_bias, delta_softplus, gaps, gap_mode)
    return u * delta / eff, eff


# --------------------------------------------------------------------------
# Causal conv1d.
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
    reverse: bool = False,
) -> Tensor:
    """The position-aware causal conv by scatter / conv / gather.

    The K tokens are scattered to their positions in a zero (batch, E,
    seq_len) tensor, the dense causal conv runs over the full length and the
    K positions are read back; reversed, on flipped copies. See
    :func:`mmssm.ops.causal_conv1d` for the arguments.
    """
    weight, positions, seq_len = check_conv_inputs(
        x, weight, bias, positions, seq_len, activation
    )
    return conv_unchecked(
        x, weight, bias, positions, seq_len, activation == 'silu', reverse
    )


def conv_unchecked(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    positions: Optional[Tensor],
    seq_len: Optional[int],
    silu: bool,
    reverse: bool = False,
) -> Tensor:
    """:func:`causal_conv1d_ref` on checked inputs: ``weight`` (E, k),
    ``positions`` None or (batch, K). The result does not depend on
    ``seq_len``; None (unknown, e.g. while tracing) runs the conv on the
    positions with every gap capped at ``k``: the taps reach the same
    tokens, and the length is known without reading the positions.
    Reversed: the causal conv of the flipped tokens (mirrored positions),
    flipped back."""
    if reverse:
        if positions is not None:
            positions = positions[:, -1:] - positions.flip(-1)
        out = conv_unchecked(
            x.flip(-1), weight, bias, positions, seq_len, silu
        )
        return out.flip(-1)
    if positions is None:
        out = _dense_causal(x, weight, bias)
    else:
        B, E, K = x.shape
        if seq_len is None:
            k = weight.shape[-1]
            gaps = positions.diff(dim=-1).clamp_max(k)
            positions = F.pad(gaps.cumsum(dim=-1), (1, 0))
            seq_len = (K - 1) * k + 1 if K else 0
        index = positions[:, None, :].expand(B, E, K)
        full = x.new_zeros(B, E, seq_len).scatter(2, index, x)
        out = _dense_causal(full, weight, bias).gather(2, index)
    return F.silu(out) if silu else out
