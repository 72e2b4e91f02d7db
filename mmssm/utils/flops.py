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
from collections import defaultdict
from dataclasses import dataclass, field
from math import prod
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from mmssm.ops import SCAN_CONVENTIONS
from mmssm.ops.flop_formulas import causal_conv_macs, scan_elements

__all__ = [
    'SCAN_CONVENTIONS',
    'FlopsReport',
    'count_flops',
    'count_params',
    'infer_scan_convention',
]

CATEGORIES = ('linear', 'conv', 'scan')


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
            return self.add_scan(scan_elements(u, A))

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


def count_params(model: nn.Module) -> int:
    """All parameters of a model (trainable or not, shared ones once)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(
    model: nn.Module,
    inputs: Any,
    scan_convention: str = 'auto',
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
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
    was_training = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
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
    return report
