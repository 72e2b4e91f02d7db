"""Count the FLOPs and parameters of what a model really runs.

:func:`count_flops` runs the model once under PyTorch's
``torch.utils.flop_counter.FlopCounterMode`` with formulas in
multiply-accumulates (MACs, the unit of the published PlainMamba and Vim
tables) for matrix products (linear layers), convolutions and mmssm's
custom ops, with the shapes they actually get: a token-pruned model is
counted on its kept tokens. The scan is counted under a scan convention
(9 or 3 MACs per scanned element, 'plainmamba' or 'vim'), the model
family's by default (the ``scan_convention`` attribute of the backbone's
class); docs/flops.md says what is counted, what is not, and where the two
conventions come from.
"""

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from math import prod
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from mmssm.errors import UserError
from mmssm.ops import SCAN_CONVENTIONS
from mmssm.ops.flop_formulas import (
    causal_conv_macs,
    delta_proj_macs,
    scan_elements,
)

__all__ = [
    'SCAN_CONVENTIONS',
    'DIRECTION_PARTS',
    'FlopsReport',
    'count_flops',
    'count_params',
    'infer_scan_convention',
    'measure_direction_keep',
]

CATEGORIES = ('linear', 'conv', 'scan')

#: What one scan direction of each family's mixer computes on its own, the
#: part a direction gate skips (DyVM's FLOPs rule scales it by the kept
#: fraction of directions): the categories counted at the mixer itself
#: (functional calls: the causal conv, ``dt_proj``, the scan) and its
#: child modules. Vim: each direction has its own conv, ``x_proj``,
#: ``dt_proj`` and scan (DyVM's "SSM part"); PlainMamba: the 2-D conv,
#: ``x_proj`` and ``dt_proj`` serve all four directions (the step inputs
#: are the raster token's), only the scans are per direction. ``in_proj``
#: and ``out_proj`` always run.
DIRECTION_PARTS = {
    'vim': dict(
        own=('linear', 'conv', 'scan_elements'),
        children=('x_proj', 'x_proj_b'),
    ),
    'plainmamba': dict(own=('scan_elements',), children=()),
}


def _check_convention(scan_convention: str) -> None:
    if scan_convention not in SCAN_CONVENTIONS:
        raise ValueError(
            f'scan_convention must be one of {list(SCAN_CONVENTIONS)}, '
            f'got {scan_convention!r}'
        )


@dataclass
class FlopsReport:
    """The operations counted in one run of a model.

    Attributes:
        linear (int): MACs of linear layers (matrix products).
        conv (int): MACs of convolutions.
        scan_elements (int): Sum over scan calls of ``batch * K * dim * N``;
            the scan's MACs are ``coef * scan_elements``.
        scan_calls (int): Calls of :func:`mmssm.ops.selective_scan`.
        scan_convention (str): The convention of :attr:`scan` and
            :attr:`total`.
        params (int): Parameters of the model.
        by_module (dict[str, dict[str, int]]): The innermost running module
            of each counted op ('' for the root) -> its ``linear``, ``conv``
            and ``scan_elements``.
    """

    linear: int = 0
    conv: int = 0
    scan_elements: int = 0
    scan_calls: int = 0
    scan_convention: str = 'plainmamba'
    params: int = 0
    by_module: Dict[str, Dict[str, int]] = field(default_factory=dict)

    def scan_for(self, scan_convention: Optional[str] = None) -> int:
        """MACs of the scans under a convention (default: the report's)."""
        scan_convention = scan_convention or self.scan_convention
        _check_convention(scan_convention)
        return SCAN_CONVENTIONS[scan_convention] * self.scan_elements

    def total_for(self, scan_convention: Optional[str] = None) -> int:
        """Total MACs under a scan convention (default: the report's)."""
        return self.linear + self.conv + self.scan_for(scan_convention)

    @property
    def scan(self) -> int:
        """MACs of the scans under the report's convention."""
        return self.scan_for()

    @property
    def total(self) -> int:
        """Total MACs under the report's convention."""
        return self.total_for()

    def by_prefix(
        self, depth: int, scan_convention: Optional[str] = None
    ) -> Dict[str, Dict[str, int]]:
        """MACs per category, grouped by module names cut to ``depth``.

        Args:
            depth (int): Dotted components kept, e.g. 2 groups
                ``backbone.layers.3.mamba.in_proj`` as ``backbone.layers``.
            scan_convention (str, optional): Defaults to the report's.

        Returns:
            dict[str, dict[str, int]]: Name -> ``linear``, ``conv``,
            ``scan``, ``total``, in order of first appearance.
        """
        coef = SCAN_CONVENTIONS[scan_convention or self.scan_convention]
        groups: Dict[str, Dict[str, int]] = {}
        for name, counts in self.by_module.items():
            key = '.'.join(name.split('.')[:depth]) if depth > 0 else ''
            group = groups.setdefault(key, dict.fromkeys(CATEGORIES, 0))
            group['linear'] += counts.get('linear', 0)
            group['conv'] += counts.get('conv', 0)
            group['scan'] += coef * counts.get('scan_elements', 0)
        for group in groups.values():
            group['total'] = sum(group[c] for c in CATEGORIES)
        return groups

    def table(self, other_conventions: bool = True) -> str:
        """A markdown table of the MACs per category (in G).

        Args:
            other_conventions (bool): Add a row with the total under each
                other scan convention. Defaults to True.

        Returns:
            str: The table.
        """
        conv = self.scan_convention
        coef = SCAN_CONVENTIONS[conv]
        total = self.total
        rows = [
            ('linear', self.linear),
            ('conv', self.conv),
            (
                f'scan ({conv}: {coef}*K*dim*N, {self.scan_calls} calls)',
                self.scan,
            ),
        ]
        lines = ['| category | FLOPs (G) | share |', '|---|---:|---:|']
        for name, macs in rows:
            share = f'{100 * macs / total:.1f}%' if total else '-'
            lines.append(f'| {name} | {macs / 1e9:.3f} | {share} |')
        lines.append(f'| **total ({conv})** | **{total / 1e9:.3f}** | |')
        if other_conventions:
            for other, other_coef in SCAN_CONVENTIONS.items():
                if other != conv:
                    lines.append(
                        f'| total ({other}: scan {other_coef}*K*dim*N) | '
                        f'{self.total_for(other) / 1e9:.3f} | |'
                    )
        return '\n'.join(lines)


class _Recorder:
    """Turns the counter's formula calls into a :class:`FlopsReport`.

    Each formula returns an op's MACs to ``FlopCounterMode`` and also
    records them here by category and by the innermost running module
    (``stack[-1]``).
    """

    def __init__(self, scan_convention: str) -> None:
        self.coef = SCAN_CONVENTIONS[scan_convention]
        self.report = FlopsReport(scan_convention=scan_convention)
        self.by_module: Dict[str, Dict[str, int]] = defaultdict(
            lambda: defaultdict(int)
        )
        self.stack: List[str] = ['']

    def add(self, category: str, macs: int) -> int:
        setattr(self.report, category, getattr(self.report, category) + macs)
        self.by_module[self.stack[-1]][category] += macs
        return macs

    def add_scan(self, elements: int) -> int:
        self.report.scan_elements += elements
        self.report.scan_calls += 1
        self.by_module[self.stack[-1]]['scan_elements'] += elements
        return self.coef * elements

    def formulas(self) -> Dict[Any, Callable]:
        """``custom_mapping`` of ``FlopCounterMode``: op -> MACs formula
        (the arguments' tensors replaced by their shapes)."""

        def matmul(a, b, *args, out_shape=None, **kwargs):  # mm, bmm
            return self.add('linear', prod(out_shape) * a[-1])

        def matmul_add(bias, a, b, *args, out_shape=None, **kwargs):
            return self.add('linear', prod(out_shape) * a[-1])

        def conv(x, w, bias, stride, pad, dil, transposed, *args, **kwargs):
            # per output element of a conv, per input element of a
            # transposed one: the weight's (C / groups) x prod(kernel) MACs
            elements = prod(x if transposed else kwargs['out_shape'])
            return self.add('conv', elements * prod(w[1:]))

        def causal_conv(x, w, *args, out_shape=None, **kwargs):
            return self.add('conv', causal_conv_macs(out_shape, w))

        def scan(u, delta, A, *args, **kwargs):
            # a fused dt_proj (delta_proj) counts as the linear layer
            proj = self.add('linear', delta_proj_macs(u, args, kwargs))
            return proj + self.add_scan(scan_elements(u, A))

        aten = torch.ops.aten
        return {
            aten.mm: matmul,
            aten.bmm: matmul,
            aten.addmm: matmul_add,
            aten.baddbmm: matmul_add,
            aten.convolution: conv,
            aten._convolution: conv,
            torch.ops.mmssm.causal_conv1d: causal_conv,
            torch.ops.mmssm.selective_scan: scan,
        }


@contextlib.contextmanager
def _module_names(model: nn.Module, stack: List[str]) -> Iterator[None]:
    """Keep ``stack[-1]`` the name of the innermost running module."""
    handles = []

    def push(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            stack.append(name)

        return hook

    def pop(module: nn.Module, args: tuple, output: Any) -> None:
        stack.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(push(name)))
        handles.append(module.register_forward_hook(pop, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def infer_scan_convention(model: nn.Module) -> Optional[str]:
    """The scan convention of the model's family, or None if unknown.

    The first submodule whose class sets a ``scan_convention`` (the
    backbones do: the convention of their published figures) decides.

    Args:
        model (nn.Module): The model.

    Returns:
        str | None: E.g. 'plainmamba' for a model with a PlainMamba
        backbone, 'vim' for Vim.
    """
    for module in model.modules():
        convention = getattr(type(module), 'scan_convention', None)
        if convention:  # a base class may set '' (no family)
            _check_convention(convention)
            return convention
    return None


def _mixers(model: nn.Module) -> Dict[str, str]:
    """Name of every scan mixer (a module with a ``direction_gate``
    attribute) -> its backbone's family."""
    mixers = {}
    for name, module in model.named_modules():
        family = getattr(type(module), 'family', '')
        if family:
            for sub, child in module.named_modules():
                if hasattr(child, 'direction_gate'):
                    full = f'{name}.{sub}' if name else sub
                    mixers[full] = family
    return mixers


def _on_meta(inputs: Any) -> bool:
    """Whether the inputs (a tensor, or a tuple holding some) are meta."""
    items = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    return any(
        isinstance(t, torch.Tensor) and t.device.type == 'meta' for t in items
    )


@contextlib.contextmanager
def _all_directions(model: nn.Module) -> Iterator[None]:
    """Every direction gate on (its eval threshold at -inf) meanwhile."""
    gates = [
        m.direction_gate
        for m in model.modules()
        if getattr(m, 'direction_gate', None) is not None
    ]
    saved = [g.threshold_logit for g in gates]
    for g in gates:
        g.threshold_logit = -math.inf
    try:
        yield
    finally:
        for g, t in zip(gates, saved):
            g.threshold_logit = t


def _scale_directions(
    report: FlopsReport, mixers: Dict[str, str], keep: float
) -> None:
    """DyVM's rule: the per-direction part of every mixer times ``keep``."""
    for mixer, family in mixers.items():
        if family not in DIRECTION_PARTS:
            raise ValueError(
                f'no per-direction part is known for the family {family!r}'
            )
        parts = DIRECTION_PARTS[family]
        names = [mixer] + [f'{mixer}.{c}' for c in parts['children']]
        for name in names:
            counts = report.by_module.get(name)
            if not counts:
                continue
            categories = parts['own'] if name == mixer else counts.keys()
            for category in list(categories):
                if category not in counts:
                    continue
                cut = counts[category] - round(keep * counts[category])
                counts[category] -= cut
                setattr(report, category, getattr(report, category) - cut)


def measure_direction_keep(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
) -> float:
    """The mean of the direction gates' eval bits over a data set.

    The mean over every layer, image and direction of the bits the gates
    report (``aux_outputs['direction_gates']`` of the model's mmssm
    backbones), as DyVM measures its direction keep on the validation set.

    Args:
        model (nn.Module): A model with direction gates; run in eval mode
            without gradient (its mode is restored).
        batches (Iterable): Inputs, one per forward.
        forward (Callable, optional): ``forward(model, batch)``; None:
            ``model(batch)``. Defaults to None.

    Returns:
        float: The kept fraction of the directions.
    """
    backbones = [m for m in model.modules() if hasattr(m, 'aux_outputs')]
    kept = total = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch) if forward else model(batch)
                for backbone in backbones:
                    for bits in backbone.aux_outputs.get(
                        'direction_gates', []
                    ):
                        kept += float(bits.sum())
                        total += bits.numel()
    finally:
        model.train(was_training)
    if not total:
        raise ValueError(
            'the model reported no direction gates: build its backbone '
            'with direction_gate=True'
        )
    return kept / total


def count_params(model: nn.Module) -> int:
    """All parameters of a model (trainable or not, shared ones once)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(
    model: nn.Module,
    inputs: Any,
    scan_convention: str = 'auto',
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    direction_keep: Optional[float] = None,
) -> FlopsReport:
    """Run ``model`` once on ``inputs`` and count what it computes.

    The model runs in eval mode under ``torch.no_grad()`` (its mode is
    restored afterwards). See docs/flops.md for what is counted.

    Args:
        model (nn.Module): The model; its parameters are counted.
        inputs (Any): The input; a tuple is unpacked as positional
            arguments of the default forward.
        scan_convention (str): 'plainmamba' (9 MACs per scanned element),
            'vim' (3), or 'auto': the convention of the model's family
            (:func:`infer_scan_convention`). Defaults to 'auto'.
        forward (Callable, optional): ``forward(model, inputs)`` to run
            instead of ``model(inputs)``, e.g. ``lambda m, x:
            m.extract_feat(x)`` to count a detector's backbone and neck
            only. Defaults to None.
        direction_keep (float, optional): DyVM's FLOPs rule for scan-
            direction selection: count with every direction running (the
            gates' eval thresholds at -inf meanwhile), then scale each
            mixer's per-direction part (:data:`DIRECTION_PARTS`) by this
            kept fraction (measured with :func:`measure_direction_keep`, or
            a target). None: count what runs on ``inputs`` (with gates,
            the directions their bits switch off are skipped).
            Defaults to None.

    Returns:
        FlopsReport: The counts, for the whole batch.
    """
    if scan_convention == 'auto':
        inferred = infer_scan_convention(model)
        if inferred is None:
            raise ValueError(
                f'cannot infer the scan convention of '
                f'{type(model).__name__}: no module whose class sets '
                f'scan_convention; pass one of {list(SCAN_CONVENTIONS)}'
            )
        scan_convention = inferred
    _check_convention(scan_convention)
    if forward is None:

        def forward(m: nn.Module, x: Any) -> Any:
            return m(*x) if isinstance(x, tuple) else m(x)

    recorder = _Recorder(scan_convention)
    counter = FlopCounterMode(
        display=False, custom_mapping=recorder.formulas()
    )
    if direction_keep is not None and not 0 <= direction_keep <= 1:
        raise ValueError(
            f'direction_keep must be in [0, 1], got {direction_keep}'
        )
    gated = any(
        getattr(m, 'direction_gate', None) is not None for m in model.modules()
    )
    if direction_keep is None and gated and _on_meta(inputs):
        raise UserError(
            'the model has direction gates, whose bits are unknown on the '
            'meta device: pass direction_keep (get_flops.py '
            '--direction-keep), or count on real inputs'
        )
    was_training = model.training
    model.eval()
    gates_on = (
        _all_directions(model)
        if direction_keep is not None
        else contextlib.nullcontext()
    )
    try:
        with (
            torch.no_grad(),
            gates_on,
            _module_names(model, recorder.stack),
            counter,
        ):
            forward(model, inputs)
    finally:
        model.train(was_training)
    report = recorder.report
    report.params = count_params(model)
    report.by_module = {
        name: dict(counts) for name, counts in recorder.by_module.items()
    }
    if direction_keep is not None:
        _scale_directions(report, _mixers(model), direction_keep)
    return report
