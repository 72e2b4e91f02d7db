"""Count the FLOPs and parameters of what a model really computes.

:func:`count_flops` runs the model once on the given input and counts the
operations that actually execute, with the shapes they actually get: a
token-pruned model, whose layers run on fewer tokens, is counted on those
tokens. All figures are multiply-accumulates (MACs), the convention of the
published PlainMamba and Vim tables (and of mmcv/fvcore): "FLOPs" below and
in the tools means MACs.

What is counted, and how:

* **linear**: every call of ``torch.nn.functional.linear`` (which
  ``nn.Linear`` calls), ``in_features * out_features`` per input row, i.e.
  ``output.numel() * in_features``. Bias additions are not counted. Calls
  are seen at the function level (a ``TorchFunctionMode``), not by forward
  hooks on ``nn.Linear``: the backbones call some layers functionally with
  a module's weight (``dt_proj``, whose bias goes to the scan, and Vim's
  causal ``conv1d``), and a hook on the module would miss them.
* **conv**: every call of ``torch.conv1d/2d/3d``, ``output.numel() *
  (in_channels / groups) * prod(kernel)``, from the actual output size, so
  strides, padding and groups (depthwise convs) are accounted for;
  transposed convolutions count ``input.numel() * (out_channels / groups) *
  prod(kernel)``. :func:`mmssm.ops.causal_conv1d` (Vim's depthwise conv,
  position-aware when pruned) counts ``output.numel() * k``: ``k`` taps for
  each of the K tokens it returns, whichever implementation runs.
* **scan**: every call of :func:`mmssm.ops.selective_scan` (reported through
  :func:`mmssm.ops.scan_listener`) with ``u`` of shape (batch, dim, K) and
  ``N`` states counts ``coef * K * dim * N`` per sequence, i.e.
  ``coef * batch * K * dim * N``. K is the number of tokens actually
  scanned (the kept tokens of a pruned scan; the state advance across the
  pruned gaps is not counted). ``coef`` is the *scan convention*:

  - ``'plainmamba'``: 9, the count of VMamba's ``flops_selective_scan_fn``
    (``9 * B * L * D * N``, after state-spaces/mamba issue #110; its extra
    ``B * D * L`` for the ``D`` skip is element-wise and not counted here).
    With it, PlainMamba's published figures (3.0 / 8.1 / 14.4 G for L1 /
    L2 / L3) are reproduced to within 0.5%.
  - ``'vim'``: 3, a lighter count (one multiply-accumulate each for the
    decay, the input and the output per state). Vim's published figures
    (1.50 / 5.10 G for Vim-T / Vim-S, taken from another paper's table)
    fit it (1.47 / 5.20 G), not the heavier one.

  The two families' numbers were thus produced with different
  conventions; a report keeps the scan's element count, so that its total
  under either convention is available (:meth:`FlopsReport.total_for`).

Not counted: norms, activations (SiLU, GELU, softplus), ``exp``,
element-wise additions and products (residuals, gating, ``D * u``, position
embeddings), pooling, interpolation, ``grid_sample`` (the deformable
attention's sampling), gathers/scatters, and explicit ``matmul``/``bmm``/
``einsum`` (none of the counted models uses them outside the scan's
reference implementations). Parameters are all the model's parameters
(trainable or frozen, shared ones once); buffers are not counted.

Example::

    >>> from mmssm.utils import count_flops
    >>> report = count_flops(model, torch.randn(1, 3, 224, 224))
    >>> print(report.table())
    >>> report.total / 1e9, report.params / 1e6
"""

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from mmssm.ops import ScanCall, causal_conv1d, scan_listener

#: Multiply-accumulates per scanned element (sequence x token x channel x
#: state) of each scan convention.
SCAN_CONVENTIONS: Dict[str, int] = {'plainmamba': 9, 'vim': 3}

#: The scan convention of a model family, by module class name: the one its
#: published figures use. A module class may instead define an attribute
#: ``flops_scan_convention``.
FAMILY_CONVENTIONS: Dict[str, str] = {
    'PlainMamba': 'plainmamba',
    'PlainMambaMixer': 'plainmamba',
    'Vim': 'vim',
    'BiMambaV2': 'vim',
}

CATEGORIES = ('linear', 'conv', 'scan')


def _linear_macs(args: tuple, kwargs: dict, out: Tensor) -> int:
    weight = args[1] if len(args) > 1 else kwargs['weight']
    return out.numel() * weight.shape[-1]


def _conv_macs(args: tuple, kwargs: dict, out: Tensor) -> int:
    weight = args[1] if len(args) > 1 else kwargs['weight']
    return out.numel() * weight[0].numel()


def _causal_conv_macs(args: tuple, kwargs: dict, out: Tensor) -> int:
    weight = args[1] if len(args) > 1 else kwargs['weight']
    return out.numel() * weight.shape[-1]


def _conv_transpose_macs(args: tuple, kwargs: dict, out: Tensor) -> int:
    inputs = args[0] if args else kwargs['input']
    weight = args[1] if len(args) > 1 else kwargs['weight']
    return inputs.numel() * weight[0].numel()


# function -> (category, MACs of one call from its arguments and output)
_RULES: Dict[Callable, Tuple[str, Callable[[tuple, dict, Tensor], int]]] = {
    F.linear: ('linear', _linear_macs),
    **{getattr(torch, f'conv{d}d'): ('conv', _conv_macs) for d in (1, 2, 3)},
    **{
        getattr(torch, f'conv_transpose{d}d'): ('conv', _conv_transpose_macs)
        for d in (1, 2, 3)
    },
    causal_conv1d: ('conv', _causal_conv_macs),
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
        linear (int): MACs of linear layers.
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


class _Counter(TorchFunctionMode):
    """Counts linear/conv calls and scans, by the innermost module."""

    def __init__(self) -> None:
        super().__init__()
        self.report = FlopsReport()
        self.by_module: Dict[str, Dict[str, int]] = defaultdict(
            lambda: defaultdict(int)
        )
        self.stack: List[str] = ['']

    def __torch_function__(
        self,
        func: Callable,
        types: tuple,
        args: tuple = (),
        kwargs: Optional[dict] = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rule = _RULES.get(func)
        if rule is not None:
            category, macs_fn = rule
            macs = int(macs_fn(args, kwargs, out))
            setattr(
                self.report, category, getattr(self.report, category) + macs
            )
            self.by_module[self.stack[-1]][category] += macs
        return out

    def on_scan(self, call: ScanCall) -> None:
        elements = call.batch * call.length * call.dim * call.d_state
        self.report.scan_elements += elements
        self.report.scan_calls += 1
        self.by_module[self.stack[-1]]['scan_elements'] += elements


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

    The first submodule whose class defines ``flops_scan_convention`` or
    is named in :data:`FAMILY_CONVENTIONS` decides.

    Args:
        model (nn.Module): The model.

    Returns:
        str | None: E.g. 'plainmamba' for a model with a PlainMamba
        backbone, 'vim' for Vim.
    """
    for module in model.modules():
        convention = getattr(module, 'flops_scan_convention', None)
        if convention is None:
            convention = FAMILY_CONVENTIONS.get(type(module).__name__)
        if convention is not None:
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
    restored afterwards). See the module docstring for what is counted.

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
                f'{type(model).__name__}: no module of a known family '
                f'({sorted(FAMILY_CONVENTIONS)}); pass one of '
                f'{list(SCAN_CONVENTIONS)}'
            )
        scan_convention = inferred
    _check_convention(scan_convention)
    if forward is None:

        def forward(m: nn.Module, x: Any) -> Any:
            return m(*x) if isinstance(x, tuple) else m(x)

    counter = _Counter()
    was_training = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
            _module_names(model, counter.stack),
            scan_listener(counter.on_scan),
            counter,
        ):
            forward(model, inputs)
    finally:
        model.train(was_training)
    report = counter.report
    report.scan_convention = scan_convention
    report.params = count_params(model)
    report.by_module = {
        name: dict(counts) for name, counts in counter.by_module.items()
    }
    return report
