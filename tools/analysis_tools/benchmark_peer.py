"""The SSM backbones against the transformer a user would pick instead.

Issue 18's table, side by side in one run on the CPU (batch 1, random
weights, ``--threads`` threads):

* ``vim``: timm's DeiT-Ti/S/B (``dynamic_img_size=True``) against Vim-S,
  dense and pruned by the paper's schedule, at 224, 448 and 896;
* ``det``: PlainMamba-L1/L2/L3 against DeiT-Ti/S/B at the detection input
  (800 x 1344);
* ``scan``: the selective scan at the detection shape (batch 1, dim 768,
  N 16, 50 x 83 tokens), dense and keeping half of the tokens, against two
  floors: ``benchmark_scan.py``'s exp floor (one float32 exp per state
  update) and the FMA roofline (12 FMA-equivalents per state update at the
  FMA rate that a dense float32 matmul reaches in this process);
* ``profile``: the shares of the forward's self CPU time (torch.profiler)
  of Vim-S and PlainMamba-L1 at 224: ``aten::copy_`` (layout copies),
  ``aten::gather``, the scan, the convs and the GEMMs.

Every model's forward (eval, ``torch.no_grad``) and forward+backward (the
sum of its output) is timed: the models of one input size alternate, round
after round, and each gets the median of its ``--rounds``. The machine line
says how many cores the run had and its load: on a shared machine the
ratios of one run are what the table is for. Example::

    python tools/analysis_tools/benchmark_peer.py --threads 2
    python tools/analysis_tools/benchmark_peer.py --sections vim scan \\
        --sizes 224 --rounds 3
    python tools/analysis_tools/benchmark_peer.py --threads 1 \\
        --rounds 2 --warmup 0 --backward-sections vim  # a shared machine
"""

import argparse
import os
import os.path as osp
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from mmssm.ops import ext_status, selective_scan
from mmssm.ops.ext import loaded_isa

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from benchmark_scan import exp_floor_per_element, make_inputs  # noqa: E402

SECTIONS = ('vim', 'det', 'scan', 'profile')
DEIT = {
    'DeiT-Ti': 'deit_tiny_patch16_224',
    'DeiT-S': 'deit_small_patch16_224',
    'DeiT-B': 'deit_base_patch16_224',
}
DET_INPUT = (800, 1344)
#: FMA-equivalents per state update of the scan (issue 18's count: the
#: decay's exp, its product with the state, the input and the output).
FMA_PER_UPDATE = 12
#: Batch, dim, N, tokens of the scan rows: one Vim-S direction at the
#: detection input (a 50 x 83 grid).
SCAN_SHAPE = (1, 768, 16, 50 * 83)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument(
        '--sections', nargs='+', default=list(SECTIONS), choices=SECTIONS
    )
    parser.add_argument(
        '--sizes',
        nargs='+',
        type=int,
        default=[224, 448, 896],
        help='input sizes of the vim section',
    )
    parser.add_argument(
        '--rounds', type=int, default=3, help='timed rounds (median)'
    )
    parser.add_argument(
        '--warmup', type=int, default=1, help='untimed rounds first'
    )
    parser.add_argument(
        '--backward-sections',
        nargs='*',
        default=['vim', 'det'],
        choices=['vim', 'det'],
        help='the model sections whose forward+backward is timed too '
        '(the det section is long)',
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error('--rounds must be at least 1')
    return args


# --------------------------------------------------------------------------
# Models.
# --------------------------------------------------------------------------
def deit(name: str) -> torch.nn.Module:
    """timm's DeiT with random weights, any input size."""
    import timm

    model = timm.create_model(
        DEIT[name], pretrained=False, dynamic_img_size=True, num_classes=0
    )
    return model.eval()


def vim_s(pruned: bool) -> torch.nn.Module:
    from mmssm.models.backbones import Vim

    return Vim('s', prune_cfg='paper' if pruned else None).eval()


def plainmamba(arch: str) -> torch.nn.Module:
    from mmssm.models.backbones import PlainMamba

    return PlainMamba(arch).eval()


def _sum(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    return sum(_sum(o) for o in out)


def time_group(
    models: Dict[str, torch.nn.Module],
    x: torch.Tensor,
    rounds: int,
    warmup: int,
    backward: bool,
) -> Dict[str, Tuple[float, float]]:
    """Median forward and forward+backward ms of each model, the models
    alternating within each round (NaN where not timed)."""
    times = {name: ([], []) for name in models}
    for r in range(warmup + rounds):
        for name, model in models.items():
            with torch.no_grad():
                start = time.perf_counter()
                model(x)
                fwd = time.perf_counter() - start
            fwd_bwd = float('nan')
            if backward:
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                _sum(model(x)).backward()
                fwd_bwd = time.perf_counter() - start
                model.zero_grad(set_to_none=True)
            if r >= warmup:
                times[name][0].append(fwd * 1e3)
                times[name][1].append(fwd_bwd * 1e3)
            print(f'  {name}: {fwd * 1e3:.0f} ms', file=sys.stderr)
    return {
        name: (statistics.median(f), statistics.median(b))
        for name, (f, b) in times.items()
    }


def ratio_table(
    title: str,
    sizes: Sequence[str],
    results: Dict[str, Dict[str, Tuple[float, float]]],
    pairs: Sequence[Tuple[str, str]],
) -> List[str]:
    """Rows of ms per model and the ratios ``a / b`` of ``pairs``."""
    names = list(next(iter(results.values())))
    head = ['input', 'pass', *[f'{n} (ms)' for n in names]]
    head += [f'{a} / {b}' for a, b in pairs]
    lines = [f'### {title}', '', '| ' + ' | '.join(head) + ' |']
    lines.append('|---|---|' + '---:|' * (len(head) - 2))
    for size in sizes:
        res = results[size]
        for i, label in enumerate(('fwd', 'fwd+bwd')):
            ms = [res[n][i] for n in names]
            if all(m != m for m in ms):  # NaN: not timed
                continue
            cells = [size, label, *[f'{m:.0f}' for m in ms]]
            cells += [f'{res[a][i] / res[b][i]:.2f}' for a, b in pairs]
            lines.append('| ' + ' | '.join(cells) + ' |')
    return lines + ['']


def vim_section(args) -> List[str]:
    models = {
        **{name: deit(name) for name in DEIT},
        'Vim-S': vim_s(False),
        'Vim-S pruned': vim_s(True),
    }
    results = {}
    for size in args.sizes:
        print(f'vim section, {size}x{size} ...', file=sys.stderr)
        x = torch.randn(1, 3, size, size)
        results[f'{size}x{size}'] = time_group(
            models,
            x,
            args.rounds,
            args.warmup,
            'vim' in args.backward_sections,
        )
    pairs = [('Vim-S', 'DeiT-S'), ('Vim-S pruned', 'DeiT-S')]
    pairs += [('Vim-S pruned', 'Vim-S')]
    return ratio_table(
        'Vim-S against DeiT (batch 1)', list(results), results, pairs
    )


def det_section(args) -> List[str]:
    models = {name: deit(name) for name in DEIT}
    models.update(
        {f'PlainMamba-{a.upper()}': plainmamba(a) for a in ('l1', 'l2', 'l3')}
    )
    h, w = DET_INPUT
    print(f'det section, {h}x{w} ...', file=sys.stderr)
    x = torch.randn(1, 3, h, w)
    results = {
        f'{h}x{w}': time_group(
            models,
            x,
            args.rounds,
            args.warmup,
            'det' in args.backward_sections,
        )
    }
    pairs = [
        (f'PlainMamba-{a}', d)
        for a, d in (('L1', 'DeiT-Ti'), ('L2', 'DeiT-S'), ('L3', 'DeiT-B'))
    ]
    return ratio_table(
        'PlainMamba against DeiT at the detection input (batch 1)',
        list(results),
        results,
        pairs,
    )


# --------------------------------------------------------------------------
# The scan against its floors.
# --------------------------------------------------------------------------
def fma_per_second(n: int = 1024, repeat: int = 5) -> float:
    """FMAs per second of a dense float32 matmul in this process (the
    median of ``repeat``, as the scan's times: the best of a few short
    matmuls catches the quiet moments of a shared machine)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    seconds = statistics.median(_seconds(lambda: a @ b) for _ in range(repeat))
    return n**3 / seconds


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def scan_section(args) -> List[str]:
    batch, dim, N, L = SCAN_SHAPE
    exp_s = exp_floor_per_element()
    fma_s = fma_per_second()
    lines = [
        f'### The scan at the detection shape ({batch}x{dim}x{N}, {L} tokens)',
        '',
        f'exp floor {exp_s * 1e9:.3f} ns per state update; matmul '
        f'{fma_s / 1e9:.1f} GFMA/s, so the FMA roofline is '
        f'{FMA_PER_UPDATE / fma_s * 1e9:.3f} ns per state update.',
        '',
        '| keep | K | fwd (ms) | fwd+bwd (ms) | FMA roofline (ms) | '
        'fwd / roofline | fwd+bwd / roofline | fwd / exp floor | '
        'fwd / dense fwd |',
        '|---|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    dense_fwd = None
    for keep in (1.0, 0.5):
        torch.manual_seed(0)
        inputs, positions, K = make_inputs(batch, dim, N, L, keep)
        grads = {k: v.clone().requires_grad_() for k, v in inputs.items()}

        def forward(inputs=inputs, positions=positions):
            with torch.no_grad():
                selective_scan(
                    **inputs, delta_softplus=True, positions=positions
                )

        def forward_backward(grads=grads, positions=positions):
            y = selective_scan(
                **grads, delta_softplus=True, positions=positions
            )
            y.sum().backward()

        fwd, fwd_bwd = [], []
        forward(), forward_backward()
        for _ in range(args.rounds):  # alternating
            fwd.append(_seconds(forward) * 1e3)
            fwd_bwd.append(_seconds(forward_backward) * 1e3)
        fwd, fwd_bwd = statistics.median(fwd), statistics.median(fwd_bwd)
        updates = batch * dim * K * N
        roof = updates * FMA_PER_UPDATE / fma_s * 1e3
        dense_fwd = dense_fwd or fwd
        lines.append(
            f'| {keep:g} | {K} | {fwd:.1f} | {fwd_bwd:.1f} | {roof:.1f} | '
            f'{fwd / roof:.2f} | {fwd_bwd / roof:.2f} | '
            f'{fwd / (updates * exp_s * 1e3):.2f} | '
            f'{fwd / dense_fwd:.2f} |'
        )
    return lines + ['']


# --------------------------------------------------------------------------
# Profile shares.
# --------------------------------------------------------------------------
GROUPS = {
    'aten::copy_': ('aten::copy_',),
    'aten::gather': ('aten::gather',),
    'scan': ('mmssm::selective_scan', 'mmssm::selective_scan_backward'),
    'conv': (
        'mmssm::causal_conv1d',
        'aten::mkldnn_convolution',
        'aten::_convolution',
        'aten::thnn_conv2d',
        'aten::_slow_conv2d_forward',
    ),
    'GEMM': ('aten::mm', 'aten::addmm', 'aten::bmm'),
}


def profile_shares(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """Self CPU time of a forward's ops, grouped, as shares of the total."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares = {'total (ms)': total / 1e3}
    for group, keys in GROUPS.items():
        own = sum(e.self_cpu_time_total for e in events if e.key in keys)
        count = sum(e.count for e in events if e.key in keys)
        shares[group] = (own / total, count)
    return shares


def profile_section(args) -> List[str]:
    x = torch.randn(1, 3, 224, 224)
    rows = {
        'Vim-S': vim_s(False),
        'PlainMamba-L1': plainmamba('l1'),
    }
    head = ['model (224, fwd)', 'self CPU (ms)', *GROUPS]
    lines = [
        '### Shares of the forward self CPU time (torch.profiler)',
        '',
        '| ' + ' | '.join(head) + ' |',
        '|---|' + '---:|' * (len(head) - 1),
    ]
    for name, model in rows.items():
        print(f'profile {name} ...', file=sys.stderr)
        shares = profile_shares(model, x)
        cells = [name, f'{shares["total (ms)"]:.0f}']
        cells += [
            f'{100 * shares[g][0]:.1f}% ({shares[g][1]} calls)' for g in GROUPS
        ]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines + ['']


def machine_line(threads: int) -> str:
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    return (
        f'machine: {platform.processor() or platform.machine()}, '
        f'{os.cpu_count()} cores (load {load:.1f} at the start), '
        f'{threads} threads, torch {torch.__version__}, '
        f'mmssm._ext {ext_status()} ({loaded_isa() or "none"})'
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(machine_line(args.threads), end='\n\n')
    sections = dict(
        vim=vim_section,
        det=det_section,
        scan=scan_section,
        profile=profile_section,
    )
    for name in args.sections:
        print('\n'.join(sections[name](args)), flush=True)


if __name__ == '__main__':
    main()
