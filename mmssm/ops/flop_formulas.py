"""FLOP formulas of the custom ops, for ``torch.utils.flop_counter``.

A selective scan over ``u`` (batch, dim, K) with N states has ``batch * K *
dim * N`` scanned elements (K: the tokens actually scanned); its cost is a
*scan convention*'s multiply-accumulates (MACs) per element, 9 for
``'plainmamba'`` and 3 for ``'vim'`` (docs/flops.md says where they come
from). With ``delta_proj`` (dim, R) the scan also computes its step sizes
``delta_proj @ delta``: ``batch * K * dim * R`` MACs of a matrix product
(counted as the ``dt_proj`` linear layer it replaces would be, so a fused
model counts what the unfused one does). The causal conv1d costs ``k``
MACs per output element. These
functions take shapes, as ``torch.utils.flop_counter`` formulas do;
:func:`register_flop_formulas` registers them with torch's counter in its
unit (2 FLOPs per MAC) and the default convention.
"""

from math import prod
from typing import Callable, Dict, Sequence

import torch

#: MACs per scanned element (sequence x token x channel x state) of each
#: scan convention.
SCAN_CONVENTIONS: Dict[str, int] = {'plainmamba': 9, 'vim': 3}
#: The convention of the formulas registered with torch's counter.
DEFAULT_SCAN_CONVENTION = 'plainmamba'

Shape = Sequence[int]


def scan_elements(u_shape: Shape, A_shape: Shape) -> int:
    """``batch * K * dim * N`` of a scan of ``u`` (batch, dim, K) and
    ``A`` (dim, N)."""
    return prod(u_shape) * A_shape[1]


#: The index of ``delta_proj`` among the arguments of
#: ``mmssm::selective_scan`` after ``u``, ``delta`` and ``A``.
_DELTA_PROJ_ARG = 12


def delta_proj_macs(u_shape: Shape, args: tuple, kwargs: dict) -> int:
    """``batch * K * dim * R``: the MACs of the step sizes ``delta_proj @
    delta`` that ``mmssm::selective_scan`` computes when given
    ``delta_proj`` (dim, R), 0 without it. ``args`` and ``kwargs``: the
    op's arguments after ``u``, ``delta`` and ``A`` (shapes), as a
    flop_counter formula gets them (a trailing None may be left out)."""
    shape = kwargs.get('delta_proj')
    if shape is None and len(args) > _DELTA_PROJ_ARG:
        shape = args[_DELTA_PROJ_ARG]
    return 0 if shape is None else prod(u_shape) * shape[-1]


def causal_conv_macs(out_shape: Shape, weight_shape: Shape) -> int:
    """``k`` taps for each returned element (the K kept tokens)."""
    return prod(out_shape) * weight_shape[-1]


def scan_flop_formula(macs_per_element: int, scale: int = 1) -> Callable:
    """A flop_counter formula of ``mmssm::selective_scan``.

    Args:
        macs_per_element (int): The scan convention's MACs per element.
        scale (int): Units per MAC (torch's counter: 2). Defaults to 1.
    """

    def formula(u_shape, delta_shape, A_shape, *args, out_shape=None, **kw):
        macs = macs_per_element * scan_elements(u_shape, A_shape)
        return scale * (macs + delta_proj_macs(u_shape, args, kw))

    return formula


def causal_conv_flop_formula(scale: int = 1) -> Callable:
    """A flop_counter formula of ``mmssm::causal_conv1d``."""

    def formula(x_shape, weight_shape, *args, out_shape=None, **kwargs):
        return scale * causal_conv_macs(out_shape, weight_shape)

    return formula


def register_flop_formulas() -> None:
    """Register the ops' formulas with ``torch.utils.flop_counter``.

    FLOPs as torch counts them (2 per MAC; the scan under
    :data:`DEFAULT_SCAN_CONVENTION`); a backward pass counts twice its
    forward, as torch's own formulas do. Idempotent.
    """
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    ops = torch.ops.mmssm
    coef = SCAN_CONVENTIONS[DEFAULT_SCAN_CONVENTION]
    scan = scan_flop_formula(coef, scale=2)
    conv = causal_conv_flop_formula(scale=2)

    def scan_backward(dout_shape, u_shape, delta_shape, A_shape, *args, **kw):
        # the scan's only: the step sizes' gradients are GEMMs of their
        # own (mmssm/ops/selective_scan.py, counted as aten.mm)
        return 2 * 2 * coef * scan_elements(u_shape, A_shape)

    def conv_backward(dout_shape, x_shape, weight_shape, *args, **kwargs):
        return 2 * causal_conv_macs(x_shape, weight_shape) * 2

    formulas = {
        ops.selective_scan: scan,
        ops.selective_scan_backward: scan_backward,
        ops.causal_conv1d: conv,
        ops.causal_conv1d_backward: conv_backward,
    }
    for op, formula in formulas.items():
        if op not in flop_registry:
            register_flop_formula(op)(formula)
