"""Selective scan with pruning-aware hidden-state alignment.

Mamba's selective scan, per channel ``d`` and state ``n``::

    h_k = exp(delta_k A) h_{k-1} + delta_k B_k u_k
    y_k = C_k . h_k + D u_k                (then y * silu(z))

After token pruning only ``K`` of ``L`` tokens are scanned. ``positions``
gives their original scan positions ``p_1 < ... < p_K``; with
``g_k = p_k - p_{k-1} - 1`` pruned tokens before token ``k``, the aligned scan
advances the state across each gap without input::

    h_k = exp(delta_k A) exp(g_k gap_delta_k A) h_{k-1} + delta_k B_k u_k

``gap_mode='prev'``: ``gap_delta_k = delta_{k-1}`` (a pruned step repeats the
previous kept token's transition); ``'null'``: ``gap_delta_k =
softplus(delta_bias)`` (a pruned step is a zero-input token); ``'none'``: no
alignment, ``g_k = 0`` (the naive baseline).

Implementations, one signature (:func:`selective_scan` chooses):

* ``'ref'``: :func:`selective_scan_ref`, a sequential loop in PyTorch; the
  ground truth (float64-capable).
* ``'chunked'``: :func:`selective_scan_chunked`, a parallel scan in PyTorch
  (work-efficient within chunks, sequential across them); used when the
  compiled kernel is missing.
* ``'cpu'``: the compiled kernel ``mmssm._ext`` (``kernels/selective_scan``),
  which takes the positions natively.
* ``'cuda'``: mamba-ssm's fused kernel on CUDA tensors, through the exact
  reparametrisation :func:`align_to_dense`.
"""

import contextlib
import os
import warnings
from functools import partial
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from mmssm import _ext
except ImportError as e:  # built by setup.py; optional
    _ext = None
    _EXT_ERROR = str(e)
else:
    _EXT_ERROR = ''

GAP_MODES = ('prev', 'null', 'none')
IMPLS = ('auto', 'ref', 'chunked', 'cpu', 'cuda')
_GAP_MODE_IDS = {'none': 0, 'prev': 1, 'null': 2}
_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_warned = set()


class ScanCall(NamedTuple):
    """What one call of :func:`selective_scan` computes, for listeners.

    Attributes:
        batch (int): Sequences scanned (``u.shape[0]``).
        dim (int): Channels (``u.shape[1]``).
        length (int): Tokens actually scanned, K (``u.shape[2]``).
        d_state (int): State size N (``A.shape[1]``).
        positions (Tensor, optional): The ``positions`` argument (None:
            dense).
        gap_mode (str): The ``gap_mode`` argument.
    """

    batch: int
    dim: int
    length: int
    d_state: int
    positions: Optional[Tensor]
    gap_mode: str


_scan_listeners: List[Callable[[ScanCall], None]] = []


@contextlib.contextmanager
def scan_listener(fn: Callable[[ScanCall], None]) -> Iterator[None]:
    """Call ``fn(ScanCall)`` on every :func:`selective_scan` in the block.

    Used by :func:`mmssm.utils.count_flops` to count the scans a model
    really runs. Listeners nest; with none, a call costs one list check.

    Args:
        fn (Callable[[ScanCall], None]): The listener.
    """
    _scan_listeners.append(fn)
    try:
        yield
    finally:
        _scan_listeners.remove(fn)


def _notify_scan(
    u: Tensor, A: Tensor, positions: Optional[Tensor], gap_mode: str
) -> None:
    if u.dim() != 3 or A.dim() != 2:
        return  # the call fails its input checks
    call = ScanCall(*u.shape, A.shape[1], positions, gap_mode)
    for fn in list(_scan_listeners):
        fn(call)


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)


def ext_status() -> str:
    """Whether the compiled CPU kernel is available, and why not."""
    if _ext is None:
        return f'not built ({_EXT_ERROR})'
    return 'built'


# --------------------------------------------------------------------------
# Input checks, shared by every implementation.
# --------------------------------------------------------------------------
def _check_inputs(
    u, delta, A, B, C, D, z, delta_bias, positions, gap_mode
) -> Optional[Tensor]:
    """Validate the arguments; return positions as int64 (batch, K)."""
    if gap_mode not in GAP_MODES:
        raise ValueError(
            f'gap_mode must be one of {GAP_MODES}, got {gap_mode!r}'
        )
    named = dict(
        u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias
    )
    check_float_tensors(named)
    if u.dim() != 3:
        raise ValueError(f'u must be (batch, dim, K), got {tuple(u.shape)}')
    batch, dim, K = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f'A must be (dim={dim}, N), got {tuple(A.shape)}')
    N = A.shape[1]
    expected = dict(
        delta=(batch, dim, K),
        z=(batch, dim, K),
        B=(batch, N, K),
        C=(batch, N, K),
        D=(dim,),
        delta_bias=(dim,),
    )
    for name, shape in expected.items():
        t = named[name]
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(
                f'{name} must have shape {shape}, got {tuple(t.shape)}'
            )
    if positions is None:
        return None
    return check_positions(positions, u, 'u')


def check_float_tensors(named: Dict[str, Optional[Tensor]]) -> None:
    """Check that the given arguments are floating tensors on one device.

    Args:
        named (dict[str, Tensor | None]): The arguments by name (None ones
            are skipped); the first one's device is the reference.

    Raises:
        TypeError: An argument is not a tensor, or not a floating one.
        ValueError: An argument is on another device than the first.
    """
    first_name, first = next(iter(named.items()))
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(
                f'{name} must be a torch.Tensor, got {type(t).__name__}'
            )
        if t.dtype not in _FLOAT_TYPES:
            raise TypeError(f'{name} must be a floating tensor, got {t.dtype}')
        if t.device != first.device:
            raise ValueError(
                f'{name} is on {t.device} but {first_name} is on '
                f'{first.device}'
            )


def check_positions(positions, x: Tensor, x_name: str) -> Tensor:
    """Validate kept-token positions for ``x`` (batch, channels, K).

    Args:
        positions: int64 (K,) or (batch, K), non-negative and strictly
            increasing along K.
        x (Tensor): The sequence they index (for batch, K and device).
        x_name (str): Its argument name, for the messages.

    Returns:
        Tensor: The positions expanded to (batch, K).
    """
    batch, K = x.shape[0], x.shape[-1]
    if not isinstance(positions, Tensor):
        raise TypeError(
            'positions must be an int64 tensor, got '
            f'{type(positions).__name__}'
        )
    if positions.dtype != torch.int64:
        raise TypeError(f'positions must be int64, got {positions.dtype}')
    if positions.device != x.device:
        raise ValueError(
            f'positions is on {positions.device} but {x_name} is on {x.device}'
        )
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    if (
        positions.dim() != 2
        or positions.shape[-1] != K
        or positions.shape[0] not in (1, batch)
    ):
        raise ValueError(
            f'positions must be (K={K},) or (batch={batch}, '
            f'K={K}), got {tuple(positions.shape)}'
        )
    if K > 0 and batch > 0:
        if bool((positions[:, 0] < 0).any()):
            raise ValueError('positions must be non-negative')
        if K > 1 and bool((positions.diff(dim=-1) <= 0).any()):
            raise ValueError(
                'positions must be strictly increasing along '
                'the last dimension'
            )
    return positions.expand(batch, K)


def _gaps(positions: Tensor) -> Tensor:
    """Pruned tokens before each kept token; the leading gap counts 0.

    ``h_0 = 0``, so a leading gap changes nothing.
    """
    gaps = positions.diff(dim=-1, prepend=positions[:, :1] - 1) - 1
    return gaps


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


def _compute_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _finish(
    y: Tensor, u: Tensor, D: Optional[Tensor], z: Optional[Tensor]
) -> Tensor:
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y


# --------------------------------------------------------------------------
# Pure PyTorch implementations.
# --------------------------------------------------------------------------
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
) -> Tensor:
    """The aligned selective scan as a plain sequential loop: the reference.

    Computes in float64 for float64 ``u`` and in float32 otherwise. See
    :func:`selective_scan` for the arguments.
    """
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    return _scan_in_pytorch(
        _recurrence_loop, inputs, delta_softplus, positions, gap_mode
    )


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
) -> Tensor:
    """The aligned selective scan as a parallel scan in PyTorch.

    Inside chunks of ``chunk_size`` tokens the linear recurrence is an
    inclusive Hillis-Steele scan of ``(decay, input)`` pairs (only products
    of decays <= 1, so it is stable in float32); the chunks' final states are
    then carried across sequentially. Materialises (batch, dim, K, N).
    """
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    return _scan_in_pytorch(
        partial(_recurrence_chunked, chunk_size=chunk_size),
        inputs,
        delta_softplus,
        positions,
        gap_mode,
    )


def _scan_in_pytorch(
    recurrence, inputs, delta_softplus, positions, gap_mode
) -> Tensor:
    """Check and prepare the inputs, run ``recurrence``, add D and the gate.

    ``inputs`` are ``(u, delta, A, B, C, D, z, delta_bias)``.
    ``recurrence(u, delta, decay_delta, A, B, C)`` returns ``C_k . h_k``
    (batch, dim, K) for the softplus'd steps ``delta`` and the exponents
    ``decay_delta`` of the steps' decays (gaps included).
    """
    u, delta, A, B, C, D, z, delta_bias = inputs
    positions = _check_inputs(
        u, delta, A, B, C, D, z, delta_bias, positions, gap_mode
    )
    out_dtype = u.dtype
    dtype = _compute_dtype(u)
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    D, z, delta_bias = (
        None if t is None else t.to(dtype) for t in (D, z, delta_bias)
    )
    gaps = None if positions is None else _gaps(positions)
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    decay_delta = _effective_delta(
        delta, delta_bias, delta_softplus, gaps, gap_mode
    )
    if u.shape[-1] == 0:
        y = u.new_zeros(u.shape)
    else:
        y = recurrence(u, delta, decay_delta, A, B, C)
    return _finish(y, u, D, z).to(out_dtype)


def _recurrence_loop(u, delta, decay_delta, A, B, C) -> Tensor:
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


def _recurrence_chunked(
    u, delta, decay_delta, A, B, C, chunk_size: int
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
    gaps = None if positions is None else _gaps(positions)
    eff = _effective_delta(delta, delta_bias, delta_softplus, gaps, gap_mode)
    return u * delta / eff, eff


# --------------------------------------------------------------------------
# The compiled CPU kernel.
# --------------------------------------------------------------------------
class SelectiveScanFn(torch.autograd.Function):
    """Autograd wrapper of ``mmssm._ext.fwd`` / ``mmssm._ext.bwd``.

    Inputs are already checked. B and C are handed to the kernel as
    (batch, K, N), so that the state dimension is contiguous for SIMD.
    """

    @staticmethod
    def forward(
        ctx,
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        positions,
        delta_softplus,
        gap_mode,
    ):
        dtype = _compute_dtype(u)
        dtypes = [
            None if t is None else t.dtype
            for t in (u, delta, A, B, C, D, z, delta_bias)
        ]

        def prep(t):
            return None if t is None else t.to(dtype).contiguous()

        u_, delta_, A_, D_, z_, bias_ = (
            prep(t) for t in (u, delta, A, D, z, delta_bias)
        )
        Bt = prep(B.transpose(1, 2))
        Ct = prep(C.transpose(1, 2))
        pos = None if positions is None else positions.contiguous()
        mode = _GAP_MODE_IDS[gap_mode]
        out = _ext.fwd(
            u_, delta_, A_, Bt, Ct, D_, z_, bias_, pos, delta_softplus, mode
        )
        ctx.save_for_backward(u_, delta_, A_, Bt, Ct, D_, z_, bias_, pos)
        ctx.config = (delta_softplus, mode, dtypes)
        return out.to(u.dtype)

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, Bt, Ct, D, z, bias, pos = ctx.saved_tensors
        delta_softplus, mode, dtypes = ctx.config
        grads = _ext.bwd(
            u,
            delta,
            A,
            Bt,
            Ct,
            D,
            z,
            bias,
            pos,
            dout.to(u.dtype).contiguous(),
            delta_softplus,
            mode,
        )
        du, ddelta, dA, dBt, dCt, dD, dz, dbias = grads
        out = [
            du,
            ddelta,
            dA,
            dBt.transpose(1, 2),
            dCt.transpose(1, 2),
            dD,
            dz,
            dbias,
        ]
        out = [
            None if g is None or dt is None else g.to(dt)
            for g, dt in zip(out, dtypes)
        ]
        return (*out, None, None, None)


def _cpu_kernel_skip_reason(u: Tensor) -> str:
    if _ext is None:
        return f'the compiled kernel mmssm._ext is missing ({_EXT_ERROR})'
    if u.device.type != 'cpu':
        return f'the compiled kernel runs on the CPU, not {u.device.type}'
    return ''


def _mamba_skip_reason(u: Tensor) -> str:
    if u.device.type != 'cuda':
        return f"impl 'cuda' needs CUDA tensors, got {u.device.type}"
    try:
        import mamba_ssm.ops.selective_scan_interface  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA extension
        return f'mamba-ssm is not usable ({e})'
    return ''


def _scan_mamba(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, positions, gap_mode
):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    if positions is None or gap_mode == 'none':
        return selective_scan_fn(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus
        )
    u_eff, delta_eff = align_to_dense(
        u, delta, delta_bias, delta_softplus, positions, gap_mode
    )
    y = selective_scan_fn(u_eff, delta_eff, A, B, C)
    return _finish(y, u, D, z)


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
) -> Tensor:
    """Selective scan over K tokens that may be a pruned subset.

    Args:
        u (Tensor): Inputs, (batch, dim, K).
        delta (Tensor): Step sizes before bias/softplus, (batch, dim, K).
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
        gap_mode (str): 'prev', 'null' or 'none'; see the module docstring.
            Defaults to 'prev'.
        impl (str): 'auto', 'ref', 'chunked', 'cpu' or 'cuda'. The
            environment variable ``MMSSM_SCAN_IMPL`` overrides 'auto'.
            Defaults to 'auto'.

    Returns:
        Tensor: (batch, dim, K), in the dtype of ``u``.
    """
    if impl not in IMPLS:
        raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')
    if _scan_listeners:
        _notify_scan(u, A, positions, gap_mode)
    if impl == 'auto':
        impl = os.environ.get('MMSSM_SCAN_IMPL', 'auto')
        if impl not in IMPLS:
            raise ValueError(
                f'MMSSM_SCAN_IMPL must be one of {IMPLS}, got {impl!r}'
            )
    args = (u, delta, A, B, C, D, z, delta_bias)
    if impl == 'auto':
        if u.device.type == 'cuda':
            reason = _mamba_skip_reason(u)
            impl = 'cuda' if not reason else 'chunked'
        else:
            reason = _cpu_kernel_skip_reason(u)
            impl = 'cpu' if not reason else 'chunked'
        if reason:
            _warn_once(
                f'selective_scan: {reason}; using the PyTorch '
                "'chunked' scan instead (slower)."
            )
    if impl == 'ref':
        return selective_scan_ref(*args, delta_softplus, positions, gap_mode)
    if impl == 'chunked':
        return selective_scan_chunked(
            *args, delta_softplus, positions, gap_mode
        )
    positions = _check_inputs(
        u, delta, A, B, C, D, z, delta_bias, positions, gap_mode
    )
    if gap_mode == 'none':
        positions = None
    if impl == 'cuda':
        reason = _mamba_skip_reason(u)
        if reason:
            raise RuntimeError(f"selective_scan impl='cuda': {reason}")
        return _scan_mamba(*args, delta_softplus, positions, gap_mode)
    reason = _cpu_kernel_skip_reason(u)
    if reason:
        raise RuntimeError(f"selective_scan impl='cpu': {reason}")
    if u.shape[-1] == 0:
        return _finish(u.new_zeros(u.shape), u, D, z)
    return SelectiveScanFn.apply(*args, positions, delta_softplus, gap_mode)
