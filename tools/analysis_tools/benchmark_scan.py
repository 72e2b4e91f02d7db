"""Benchmark the selective scan implementations side by side, in one run.

Rows: the classification shape (batch 8, dim 896, N 16, K 196) and the
detection shape (batch 1, dim 768, N 16, a 50x83 grid = 4150 tokens), dense
and at keep 0.5 with random gaps (the aligned scan over the kept tokens);
forward and forward+backward time of each implementation. The last column
relates each time to the physical floor of the work: one exp per state
update, timed as ``torch.exp`` on a cache-resident float32 tensor and scaled
to batch*dim*K*N elements.

``--builds`` times the compiled kernel of several builds, alternating
round by round: 'generic' and 'avx2' (the two builds of this checkout,
setup.py) or the path of another checkout's ``_ext*.so`` (an A/B against
it). A build of sources from before the forward's chunk checkpoints (no
``scan_chunk``) runs as it did: its forward returns no checkpoints, so
its backward recomputes them (:class:`WithoutCheckpoints`).

``--dt-proj`` adds Vim-S's scan (dim 768, N 16, dt_rank 24, 197 tokens,
batch 1 and 8, the tokens-major slices of ``x_proj``'s output that the
model passes) with ``dt_proj`` fused into it (``delta_proj``) against
``dt_proj``'s GEMM followed by the scan, for the same builds (a build from
before the fusion runs both as GEMM + scan).

``--conv`` adds the position-aware causal conv1d (Vim-S: dim 768, k 4,
SiLU, the tokens-major layout of its Linear layers) at 137 of 197 tokens,
with and without positions (the aligned and the rearranged DyVM paths),
at batch 1 and 8, for the same builds.

Example::

    python tools/analysis_tools/benchmark_scan.py --threads 2
    python tools/analysis_tools/benchmark_scan.py --impls cpu \\
        --builds avx2 generic ../main/mmssm/_ext.cpython-*.so
"""

import argparse
import importlib.util
import os.path as osp
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from mmssm.errors import UserError
from mmssm.ops import causal_conv1d, ext, ext_status, selective_scan
from mmssm.ops.selective_scan import SCAN_CHUNK

SHAPES = {
    'cls': (8, 896, 16, 196),  # batch, dim, N, L
    'det': (1, 768, 16, 50 * 83),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--threads',
        type=int,
        default=2,
        help='torch/OpenMP threads. Defaults to 2.',
    )
    parser.add_argument(
        '--impls',
        nargs='+',
        default=['cpu', 'chunked', 'ref'],
        choices=['cpu', 'chunked', 'ref'],
    )
    parser.add_argument(
        '--shapes', nargs='*', default=list(SHAPES), choices=list(SHAPES)
    )
    parser.add_argument('--keeps', nargs='+', type=float, default=[1.0, 0.5])
    parser.add_argument(
        '--builds',
        nargs='+',
        default=None,
        help="builds of the compiled kernel for impl 'cpu': 'generic', "
        "'avx2' or the path of another build's _ext*.so. Defaults to the "
        'one this process loads.',
    )
    parser.add_argument(
        '--dt-proj',
        action='store_true',
        help="also time Vim-S's scan with dt_proj fused against its GEMM "
        'followed by the scan',
    )
    parser.add_argument(
        '--conv',
        action='store_true',
        help='also time the causal conv1d with and without positions',
    )
    parser.add_argument(
        '--repeat',
        type=int,
        default=10,
        help='timed runs of the fast implementations '
        "(the median is shown); 'ref' runs twice.",
    )
    return parser.parse_args()


def timed(fn, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def exp_floor_per_element(repeat=200, numel=256 * 1024):
    """Seconds per float32 exp, on a tensor that stays in cache."""
    x = -torch.rand(numel)
    out = torch.empty_like(x)
    seconds = timed(lambda: torch.exp(x, out=out), repeat)
    return seconds / numel


class WithoutCheckpoints:
    """A build from before the forward's chunk checkpoints, behind the
    current calls: its forward (13 arguments) returns the output only, its
    backward takes no checkpoints and recomputes them."""

    scan_chunk = SCAN_CHUNK

    def __init__(self, module):
        self.module = module

    def __getattr__(self, name):
        return getattr(self.module, name)

    def selective_scan_fwd(self, *args):
        out = self.module.selective_scan_fwd(*args[:-1])
        return out, out.new_empty(0)

    def selective_scan_bwd(self, *args, checkpoints=None, **kwargs):
        return self.module.selective_scan_bwd(*args, **kwargs)


def load_build(build):
    """The compiled kernels of ``build``: 'generic', 'avx2' or a path."""
    if build in ext.ISAS:
        return ext.import_isa(build)
    if not osp.isfile(build):
        raise UserError(f'--builds: {build} is neither an ISA nor a file')
    # the module's last name must be the file's (its PyInit_ symbol)
    name = osp.basename(build).split('.')[0]
    spec = importlib.util.spec_from_file_location(
        f'mmssm_ab_{abs(hash(build))}.{name}', build
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, 'scan_chunk'):
        return WithoutCheckpoints(module)
    return module


def make_inputs(batch, dim, N, L, keep):
    K = max(1, round(L * keep))
    inputs = dict(
        u=torch.randn(batch, dim, K),
        delta=torch.randn(batch, dim, K) * 0.5 - 1.0,
        A=-torch.rand(dim, N) - 0.1,
        B=torch.randn(batch, N, K),
        C=torch.randn(batch, N, K),
        D=torch.randn(dim),
        z=torch.randn(batch, dim, K),
        delta_bias=torch.randn(dim) * 0.1,
    )
    positions = None
    if keep < 1.0:
        positions = torch.stack(
            [torch.randperm(L)[:K].sort().values for _ in range(batch)]
        )
    return inputs, positions, K


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    floor = exp_floor_per_element()
    print(
        f'machine: {platform.processor() or platform.machine()}, '
        f'{args.threads} threads, torch {torch.__version__}, '
        f'mmssm._ext {ext_status()} ({ext.loaded_isa() or "none"})'
    )
    print(f'exp floor: {floor * 1e9:.3f} ns per element\n')
    # (row name, impl, kernel module or None); the cpu rows alternate
    rows = []
    for impl in args.impls:
        if impl == 'cpu' and args.builds:
            rows += [(f'cpu ({b})', 'cpu', load_build(b)) for b in args.builds]
        else:
            rows.append((impl, impl, None))
    header = (
        '| shape | keep | K | impl | fwd (ms) | fwd+bwd (ms) | '
        'floor (ms) | fwd/floor | fwd+bwd/floor |'
    )
    print(header)
    print('|---' * (header.count('|') - 1) + '|')
    loaded = ext.load_ext()
    for shape in args.shapes:
        batch, dim, N, L = SHAPES[shape]
        for keep in args.keeps:
            inputs, positions, K = make_inputs(batch, dim, N, L, keep)
            floor_ms = floor * batch * dim * K * N * 1e3
            grads = {k: v.clone().requires_grad_() for k, v in inputs.items()}
            times = {name: ([], []) for name, _, _ in rows}
            for i in range(args.repeat + 1):  # round 0: warm-up
                for name, impl, module in rows:
                    if impl == 'ref' and i > 2:
                        continue
                    ext._ext = module or loaded
                    fwd, fwd_bwd = times[name]
                    fwd.append(_time_forward(impl, inputs, positions))
                    fwd_bwd.append(_time_backward(impl, grads, positions))
            ext._ext = loaded
            for name, _, _ in rows:
                fwd, fwd_bwd = (statistics.median(t[1:]) for t in times[name])
                print(
                    f'| {shape} ({batch}x{dim}x{N}) | {keep:g} | {K} | '
                    f'{name} | {fwd:.2f} | {fwd_bwd:.2f} | '
                    f'{floor_ms:.2f} | {fwd / floor_ms:.2f} | '
                    f'{fwd_bwd / floor_ms:.2f} |',
                    flush=True,
                )
    cpu_rows = [(name, m) for name, impl, m in rows if impl == 'cpu']
    if args.dt_proj:
        dt_proj_rows(cpu_rows or [('cpu', None)], max(args.repeat, 20))
    if args.conv:
        conv_rows(cpu_rows or [('cpu', None)], max(args.repeat, 20))


def dt_proj_rows(rows, repeat):
    """Vim-S's scan (dim 768, N 16, R 24, 197 tokens) with dt_proj fused
    (``delta_proj``) and as its GEMM + the scan, alternating over the
    builds ``rows`` (name, module) and the two ways; one table row per
    (batch, build, way)."""
    print(
        '\n| Vim-S scan (dim 768, N 16, R 24, 197 tokens) | batch | build '
        '| dt_proj | fwd (ms) | fwd+bwd (ms) |'
    )
    print('|---' * 6 + '|')
    loaded = ext.load_ext()
    dim, N, R, K = 768, 16, 24, 197
    for batch in (1, 8):
        x_dbl = torch.randn(batch, K, R + 2 * N)  # x_proj's output
        x_dbl[..., :R] *= 0.2
        xz = torch.randn(batch, K, 2 * dim)  # in_proj's output
        inputs = dict(
            u=xz[..., :dim].transpose(1, 2),
            delta=x_dbl[..., :R].transpose(1, 2),
            A=-torch.rand(dim, N) - 0.1,
            B=x_dbl[..., R : R + N].transpose(1, 2),
            C=x_dbl[..., R + N :].transpose(1, 2),
            D=torch.randn(dim),
            z=xz[..., dim:].transpose(1, 2),
            delta_bias=torch.randn(dim) * 0.1 - 2.0,
            delta_proj=torch.randn(dim, R) * R**-0.5,
        )
        ways = {'fused': _fused_scan, 'GEMM + scan': _gemm_then_scan}
        times = {(n, w): ([], []) for n, _ in rows for w in ways}
        for _ in range(repeat + 1):  # round 0: warm-up
            for name, module in rows:
                ext._ext = module or loaded
                for way, fn in ways.items():
                    fwd, fwd_bwd = times[name, way]
                    start = time.perf_counter()
                    with torch.no_grad():
                        fn(**inputs)
                    fwd.append((time.perf_counter() - start) * 1e3)
                    grads = {
                        k: v.detach().requires_grad_()
                        for k, v in inputs.items()
                    }
                    start = time.perf_counter()
                    fn(**grads).sum().backward()
                    fwd_bwd.append((time.perf_counter() - start) * 1e3)
        ext._ext = loaded
        for (name, way), runs in times.items():
            fwd, fwd_bwd = (statistics.median(t[1:]) for t in runs)
            print(
                f'| | {batch} | {name} | {way} | {fwd:.3f} | {fwd_bwd:.3f} |',
                flush=True,
            )


def _fused_scan(**inputs):
    return selective_scan(**inputs, delta_softplus=True, impl='cpu')


def _gemm_then_scan(delta, delta_proj, **inputs):
    delta = F.linear(delta.transpose(1, 2), delta_proj).transpose(1, 2)
    return selective_scan(
        delta=delta, **inputs, delta_softplus=True, impl='cpu'
    )


def conv_rows(rows, repeat):
    """The conv of Vim-S at 137 of 197 tokens, with and without positions,
    alternating over the builds ``rows`` (name, module) as the scan rows;
    one table row per (batch, positions, build)."""
    print(
        '\n| conv (dim 768, k 4, 137 of 197 tokens) | batch | positions '
        '| build | fwd (ms) | fwd+bwd (ms) |'
    )
    print('|---' * 6 + '|')
    loaded = ext.load_ext()
    for batch in (1, 8):
        x = torch.randn(batch, 137, 768).transpose(1, 2)
        weight, bias = torch.randn(768, 4), torch.randn(768)
        pos = torch.stack(
            [torch.randperm(197)[:137].sort().values for _ in range(batch)]
        )
        for with_pos in (False, True):
            kwargs = dict(
                positions=pos if with_pos else None,
                activation='silu',
                impl='cpu',
            )
            grads = [t.clone().requires_grad_() for t in (x, weight, bias)]
            times = {name: ([], []) for name, _ in rows}
            for _ in range(repeat + 1):  # round 0: warm-up
                for name, module in rows:
                    ext._ext = module or loaded
                    fwd, fwd_bwd = times[name]
                    start = time.perf_counter()
                    with torch.no_grad():
                        causal_conv1d(x, weight, bias, **kwargs)
                    fwd.append((time.perf_counter() - start) * 1e3)
                    start = time.perf_counter()
                    causal_conv1d(*grads, **kwargs).sum().backward()
                    fwd_bwd.append((time.perf_counter() - start) * 1e3)
            ext._ext = loaded
            for name, _ in rows:
                fwd, fwd_bwd = (statistics.median(t[1:]) for t in times[name])
                print(
                    f'| | {batch} | {"yes" if with_pos else "no"} | {name} '
                    f'| {fwd:.3f} | {fwd_bwd:.3f} |',
                    flush=True,
                )


def _time_forward(impl, inputs, positions):
    start = time.perf_counter()
    with torch.no_grad():
        selective_scan(
            **inputs, delta_softplus=True, positions=positions, impl=impl
        )
    return (time.perf_counter() - start) * 1e3


def _time_backward(impl, grads, positions):
    start = time.perf_counter()
    y = selective_scan(
        **grads, delta_softplus=True, positions=positions, impl=impl
    )
    y.sum().backward()
    return (time.perf_counter() - start) * 1e3


if __name__ == '__main__':
    main()
