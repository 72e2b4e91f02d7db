"""Input checks of the ops, shared by every implementation.

The public wrappers check the user's arguments here, before the custom op
runs, so that a wrong input is a ``TypeError``/``ValueError`` naming the
argument whichever implementation then runs. Checks of values (positions
increasing, within ``seq_len``) need the data: they are skipped on the meta
device and while ``torch.compile`` traces.
"""

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

GAP_MODES = ('prev', 'null', 'none')
ACTIVATIONS = (None, 'silu')
_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _has_values(t: Tensor) -> bool:
    """Whether the values of ``t`` can be read (not meta, not tracing)."""
    return t.device.type != 'meta' and not torch.compiler.is_compiling()


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
    if K > 0 and batch > 0 and _has_values(positions):
        if bool((positions[:, 0] < 0).any()):
            raise ValueError('positions must be non-negative')
        if K > 1 and bool((positions.diff(dim=-1) <= 0).any()):
            raise ValueError(
                'positions must be strictly increasing along '
                'the last dimension'
            )
    return positions.expand(batch, K)


def tokens_major(t: Tensor) -> bool:
    """Whether a (batch, C, K) tensor has C innermost: a transpose of a
    (batch, K, C) tensor, the layout Linear layers produce. The kernels
    (``kernels/common/check_tensor.h``) write their outputs in the layout of
    the input by this rule, and the fake implementations follow it."""
    # bool() each test: symbolic sizes (torch.compile) give SymBools
    return (
        t.dim() == 3
        and bool(t.shape[1] > 1)
        and bool(t.shape[2] > 1)
        and bool(t.stride(1) == 1)
        and bool(t.stride(2) != 1)
    )


def empty_layout(t: Tensor) -> Tensor:
    """An uninitialised tensor like ``t`` in its layout by
    :func:`tokens_major` (contiguous otherwise)."""
    if tokens_major(t):
        return t.new_empty(t.shape[0], t.shape[2], t.shape[1]).transpose(1, 2)
    return t.new_empty(t.shape)


def match_layout(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (the shape of ``like``) in the layout of ``like``."""
    if tokens_major(like) == tokens_major(t) and (
        tokens_major(t) or t.is_contiguous()
    ):
        return t
    out = empty_layout(like)
    out.copy_(t)
    return out


def check_order(order, u: Tensor) -> Tensor:
    """Validate a scan order for ``u`` (batch, dim, K).

    Args:
        order: int64 (K,) or (batch or 1, K), a permutation of 0..K-1 in
            each row.

    Returns:
        Tensor: (batch or 1, K), contiguous.
    """
    batch, K = u.shape[0], u.shape[-1]
    if not isinstance(order, Tensor) or order.dtype != torch.int64:
        raise TypeError(
            'order must be an int64 tensor, got '
            f'{getattr(order, "dtype", order)}'
        )
    if order.device != u.device:
        raise ValueError(f'order is on {order.device} but u is on {u.device}')
    if order.dim() == 1:
        order = order.unsqueeze(0)
    if (
        order.dim() != 2
        or order.shape[1] != K
        or order.shape[0]
        not in (
            1,
            batch,
        )
    ):
        raise ValueError(
            f'order must be (K={K},) or (batch={batch} or 1, K={K}), got '
            f'{tuple(order.shape)}'
        )
    if K > 0 and _has_values(order):
        expected = torch.arange(K, device=order.device)
        if not bool((order.sort(dim=-1).values == expected).all()):
            raise ValueError('order must be a permutation of 0..K-1')
    return order.contiguous()


def check_scan_inputs(
    u, delta, A, B, C, D, z, delta_bias, positions, gap_mode, delta_proj=None
) -> Optional[Tensor]:
    """Validate the arguments of the selective scan.

    With ``delta_proj`` (dim, R), ``delta`` is the low-rank (batch, R, K)
    input of the step sizes ``delta_proj @ delta``.

    Returns:
        Tensor | None: ``positions`` as int64 (batch, K), or None.
    """
    if gap_mode not in GAP_MODES:
        raise ValueError(
            f'gap_mode must be one of {GAP_MODES}, got {gap_mode!r}'
        )
    named = dict(
        u=u,
        delta=delta,
        A=A,
        B=B,
        C=C,
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_proj=delta_proj,
    )
    check_float_tensors(named)
    if u.dim() != 3:
        raise ValueError(f'u must be (batch, dim, K), got {tuple(u.shape)}')
    batch, dim, K = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f'A must be (dim={dim}, N), got {tuple(A.shape)}')
    N = A.shape[1]
    R = None
    if delta_proj is not None:
        if delta_proj.dim() != 2 or delta_proj.shape[0] != dim:
            raise ValueError(
                f'delta_proj must be (dim={dim}, R), got '
                f'{tuple(delta_proj.shape)}'
            )
        R = delta_proj.shape[1]
    expected = dict(
        delta=(batch, dim if R is None else R, K),
        z=(batch, dim, K),
        B=(batch, N, K),
        C=(batch, N, K),
        D=(dim,),
        delta_bias=(dim,),
    )
    for name, shape in expected.items():
        t = named[name]
        if t is not None and tuple(t.shape) != shape:
            what = ''
            if name == 'delta' and R is not None:
                what = f' (batch, R, K), delta_proj being {(dim, R)}'
            raise ValueError(
                f'{name} must have shape {shape}{what}, got {tuple(t.shape)}'
            )
    if positions is None:
        return None
    return check_positions(positions, u, 'u')


def check_conv_inputs(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    positions: Optional[Tensor],
    seq_len: Optional[int],
    activation: Optional[str],
) -> Tuple[Tensor, Optional[Tensor], Optional[int]]:
    """Validate the arguments of the causal conv1d.

    Returns:
        tuple: ``weight`` as (E, k) (a view of nn.Conv1d's (E, 1, k)),
        ``positions`` as int64 (batch, K) or None, and ``seq_len``
        (``positions.max() + 1`` when not given and the values are
        readable, else as given).
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
    if not _has_values(positions):
        return weight, positions, seq_len
    last = int(positions[:, -1].max())
    if seq_len is None:
        seq_len = last + 1
    elif last >= seq_len:
        raise ValueError(f'positions reach {last}, beyond seq_len={seq_len}')
    return weight, positions, seq_len
