"""Backbone throughput and peak memory on the CPU, all rows side by side.

Each row is a small declarative spec (:class:`Row`): a config whose
``model.backbone`` is built (with optional overrides, e.g. pruning), an
input size, a batch and the scan implementation (``scan_impl``: 'cpu' is
the compiled kernel ``mmssm._ext``, 'ref' the reference loop). Rows run one
after the other, each in a fresh Python process, so that the memory of one
row cannot hide or inflate another's; the results are printed as one
markdown table, with the machine.

Timing: the backbone in eval mode under ``torch.no_grad()``, ``--warmup``
untimed forwards, then ``--iters`` timed ones; ms / iter is the median of
the timed forwards and images/s = batch / that median (every forward's
time is in the ``--json`` output). The reference loop ('ref' rows) takes
minutes per forward, so those rows run ``--ref-warmup`` (default 0) and
``--ref-iters`` (default 1) instead. The load average of the machine is
printed with the table: on a shared machine, other processes slow the rows
down. ``--rounds R`` runs every row R times, interleaved (round r starts at
row r, so that no row is always measured first or last), and reports the
median of the rounds: a virtual machine's speed drifts by tens of percent
over minutes, which one pass in a fixed order would charge to the rows
that happen to run late. ``--interleave`` goes further for the A/B
comparisons: a dense row and its pruned variants are built in one process
and their forwards alternate, so the comparison does not depend on how fast
one process happened to be (then without memory columns).

Peak memory: the resident set size (RSS) is what the CPU really holds
(``tracemalloc`` does not see torch's allocations). In the row's process,
after the model and the input are built, the kernel's RSS high-water mark
is reset to the current RSS (``/proc/self/clear_refs`` = 5, Linux >= 4.0);
after the forwards, ``peak fwd`` = high-water mark (``VmHWM``) - RSS before
the forwards: the largest extra memory a forward needed (activations,
scratch buffers, thread pools), above the weights and the input. ``peak
RSS`` is the high-water mark of the whole process (Python, torch, weights,
input and the forward). Where ``clear_refs`` is not writable, the
high-water mark is not reset and ``peak fwd`` falls back to
``ru_maxrss`` after - before, a lower bound (marked ``>=``).

Rows (:data:`ROWS`): the scan kernel against the reference loop (the
backbones), the paper's pruning against the dense model, aligned and naive
(the same config with ``backbone`` overrides), and whole Mask R-CNN
inference with the adapter, dense against aligned-pruned (``kind`` =
'detector': ``predict`` on one image, boxes and masks included; the
overrides then go to the adapter's inner backbone). A row's ``baseline``
gives the speed-up column.

Example::

    python tools/analysis_tools/benchmark.py --threads 2 --iters 3
    python tools/analysis_tools/benchmark.py --rows pm-l1-224 --impls cpu
    python tools/analysis_tools/benchmark.py --rows prune- maskrcnn-
"""

import argparse
import copy
import dataclasses
import gc
import json
import os
import os.path as osp
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Row:
    """One measurement.

    Attributes:
        key (str): Unique id, e.g. 'pm-l1-224-cpu'.
        label (str): Model name shown in the table.
        config (str): Config file, relative to the repository root.
        shape (tuple[int, int]): Input (H, W).
        batch (int): Images per forward.
        scan_impl (str): ``scan_impl`` of the backbone ('cpu', 'ref', ...).
        backbone (dict): Overrides merged into ``model.backbone``.
        kind (str): What runs, a key of :data:`BUILDERS`.
        baseline (str, optional): Key of the row the speed-up is relative
            to.
    """

    key: str
    label: str
    config: str
    shape: Tuple[int, int]
    batch: int
    scan_impl: str = 'cpu'
    backbone: Dict = dataclasses.field(default_factory=dict)
    kind: str = 'backbone'
    baseline: Optional[str] = None


def _rows(
    key: str, label: str, config: str, shape: Tuple[int, int], batch: int
) -> List[Row]:
    """The 'cpu' row (speed-up relative to 'ref') and the 'ref' row."""
    return [
        Row(f'{key}-cpu', label, config, shape, batch, 'cpu',
            baseline=f'{key}-ref'),
        Row(f'{key}-ref', label, config, shape, batch, 'ref'),
    ]  # fmt: skip


def _pruning_rows(
    key: str,
    label: str,
    config: str,
    shape: Tuple[int, int],
    batch: int,
    kind: str = 'backbone',
) -> List[Row]:
    """Dense, the paper's schedule aligned, and the same schedule naive."""
    dense = f'{key}-dense'
    return [
        Row(dense, f'{label} dense', config, shape, batch, kind=kind),
        Row(f'{key}-aligned', f'{label} paper aligned', config, shape,
            batch, backbone=dict(prune_cfg='paper'), kind=kind,
            baseline=dense),
        Row(f'{key}-naive', f'{label} paper naive', config, shape, batch,
            backbone=dict(prune_cfg=dict(schedule='paper', align=False)),
            kind=kind, baseline=dense),
    ]  # fmt: skip


PM = 'configs/plainmamba/plainmamba-{}_in1k.py'
VIM_S = 'configs/vim/vim-s_in1k.py'
MASK_RCNN = (
    'configs/mask_rcnn/mask-rcnn_plainmamba-{}_adapter-fpn_8xb2-1x_coco.py'
)
ROWS: List[Row] = [
    # the compiled scan kernel against the reference loop
    *_rows('pm-l1-224', 'PlainMamba-L1', PM.format('l1'), (224, 224), 8),
    *_rows('pm-l3-224', 'PlainMamba-L3', PM.format('l3'), (224, 224), 8),
    *_rows('vim-s-224', 'Vim-S', VIM_S, (224, 224), 8),
    *_rows('pm-l1-det', 'PlainMamba-L1', PM.format('l1'), (800, 1333), 1),
    # token pruning: dense, aligned, naive
    *_pruning_rows('prune-vim-s-224', 'Vim-S', VIM_S, (224, 224), 8),
    *_pruning_rows('prune-pm-l3-224', 'PlainMamba-L3', PM.format('l3'),
                   (224, 224), 8),
    *_pruning_rows('prune-pm-l1-det', 'PlainMamba-L1', PM.format('l1'),
                   (800, 1333), 1),
    # whole Mask R-CNN inference with the adapter
    *_pruning_rows('maskrcnn-pm-l1', 'Mask R-CNN PlainMamba-L1',
                   MASK_RCNN.format('l1'), (800, 1333), 1,
                   'detector')[:2],
    *_pruning_rows('maskrcnn-pm-l3', 'Mask R-CNN PlainMamba-L3',
                   MASK_RCNN.format('l3'), (800, 1333), 1,
                   'detector')[:2],
]  # fmt: skip


def build_backbone(row: Row):
    """The config's backbone, with the row's overrides and ``scan_impl``."""
    from mmengine.config import Config

    import mmssm.models  # noqa: F401
    from mmssm.registry import MODELS

    cfg = Config.fromfile(osp.join(ROOT, row.config))
    backbone = copy.deepcopy(cfg.model.get('backbone', cfg.model))
    backbone.update(row.backbone)
    backbone['scan_impl'] = row.scan_impl
    return MODELS.build(backbone)


def build_detector(row: Row):
    """A whole mmdet detector (random weights, SyncBN as BN) whose forward
    takes an image batch and runs ``predict``."""
    import torch
    from mmdet.registry import MODELS as DET_MODELS
    from mmdet.structures import DetDataSample
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import init_default_scope

    import mmssm.models  # noqa: F401

    cfg = Config.fromfile(osp.join(ROOT, row.config))
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    inner = cfg.model.backbone.backbone
    inner.update(row.backbone, scan_impl=row.scan_impl, init_cfg=None)
    detector = revert_sync_batchnorm(DET_MODELS.build(cfg.model))

    class Predict(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.detector = detector

        def forward(self, x):
            h, w = x.shape[-2:]
            meta = dict(
                img_shape=(h, w),
                ori_shape=(h, w),
                pad_shape=(h, w),
                scale_factor=(1.0, 1.0),
            )
            samples = [DetDataSample(metainfo=meta) for _ in range(len(x))]
            return self.detector.predict(x, samples)

    return Predict()


#: kind -> function building the module that a row runs on its input.
BUILDERS: Dict[str, Callable] = {
    'backbone': build_backbone,
    'detector': build_detector,
}


# --------------------------------------------------------------------------
# The worker: one row, in its own process.
# --------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{field} is not in /proc/self/status')


def _reset_peak_rss() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def run_row(row: Row, iters: int, warmup: int, threads: int) -> dict:
    """Build and time one row; memory in MiB."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = BUILDERS[row.kind](row).eval()
    x = torch.randn(row.batch, 3, *row.shape)
    gc.collect()
    rss_before = _status_kb('VmRSS')
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    exact = _reset_peak_rss()
    times = []
    with torch.no_grad():
        for i in range(warmup + iters):
            start = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    if exact:
        peak_fwd = _status_kb('VmHWM') - rss_before
    else:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_fwd = maxrss - maxrss_before
    return dict(
        key=row.key,
        seconds=sum(times),
        iters=len(times),
        warmup=warmup,
        # the median forward: one slow forward (another process woke up)
        # does not move it
        ms_per_iter=1e3 * statistics.median(times),
        images_per_s=row.batch / statistics.median(times),
        ms_all=[round(1e3 * t, 1) for t in times],
        peak_fwd_mib=peak_fwd / 1024,
        peak_rss_mib=_status_kb('VmHWM') / 1024,
        exact_peak=exact,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
    )


def run_interleaved(
    rows: List[Row], iters: int, warmup: int, threads: int
) -> List[dict]:
    """Build several rows in one process and time their forwards in turn.

    Forward ``i`` of every row runs before forward ``i + 1`` of any, the
    order rotating with ``i``: the rows share whatever the machine does
    meanwhile. Memory is not measured (the rows share one process).
    """
    import torch

    torch.set_num_threads(threads)
    models, inputs = [], []
    for row in rows:
        torch.manual_seed(0)
        models.append(BUILDERS[row.kind](row).eval())
        inputs.append(torch.randn(row.batch, 3, *row.shape))
    times: List[List[float]] = [[] for _ in rows]
    order = list(range(len(rows)))
    with torch.no_grad():
        for i in range(warmup + iters):
            shift = i % len(order)
            for j in order[shift:] + order[:shift]:
                start = time.perf_counter()
                models[j](inputs[j])
                if i >= warmup:
                    times[j].append(time.perf_counter() - start)
    results = []
    for row, model, t in zip(rows, models, times):
        med = statistics.median(t)
        results.append(
            dict(
                key=row.key,
                iters=len(t),
                warmup=warmup,
                ms_per_iter=1e3 * med,
                images_per_s=row.batch / med,
                ms_all=[round(1e3 * v, 1) for v in t],
                params_m=sum(p.numel() for p in model.parameters()) / 1e6,
            )
        )
    return results


def interleave_groups(rows: List[Row]) -> List[List[Row]]:
    """Rows grouped with their baseline (dense with its pruned variants)."""
    groups: Dict[str, List[Row]] = {}
    for row in rows:
        groups.setdefault(row.baseline or row.key, []).append(row)
    return list(groups.values())


# --------------------------------------------------------------------------
# The driver.
# --------------------------------------------------------------------------
def machine_line(threads: int) -> str:
    """CPU, threads, torch version and whether mmssm._ext is built."""
    import torch

    from mmssm.ops import ext_status

    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f'machine: {cpu} ({os.cpu_count()} logical CPUs visible), '
        f'{threads} threads, torch {torch.__version__}, '
        f'Python {platform.python_version()}, mmssm._ext {ext_status()}'
    )


def parse_args() -> argparse.Namespace:
    keys = sorted({r.key.rsplit('-', 1)[0] for r in ROWS})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--rows',
        nargs='+',
        default=None,
        help=f'rows to run: row keys or their prefixes ({", ".join(keys)}; '
        'with the impl suffix, e.g. pm-l1-224-cpu, one row). '
        'Defaults to all.',
    )
    parser.add_argument(
        '--impls',
        nargs='+',
        default=None,
        help="keep only rows with these scan_impl (e.g. 'cpu'). "
        'Defaults to all.',
    )
    parser.add_argument(
        '--iters', type=int, default=3, help='timed forwards. Defaults to 3.'
    )
    parser.add_argument(
        '--warmup',
        type=int,
        default=1,
        help='untimed forwards first. Defaults to 1.',
    )
    parser.add_argument(
        '--ref-iters',
        type=int,
        default=1,
        help="timed forwards of 'ref' rows. Defaults to 1.",
    )
    parser.add_argument(
        '--ref-warmup',
        type=int,
        default=0,
        help="untimed forwards of 'ref' rows. Defaults to 0.",
    )
    parser.add_argument(
        '--threads',
        type=int,
        default=2,
        help='torch/OpenMP threads per row. Defaults to 2.',
    )
    parser.add_argument(
        '--timeout',
        type=float,
        default=3600,
        help='seconds allowed per row. Defaults to 3600.',
    )
    parser.add_argument(
        '--rounds',
        type=int,
        default=1,
        help='passes over the rows, interleaved; the median is reported. '
        'Defaults to 1.',
    )
    parser.add_argument(
        '--interleave',
        action='store_true',
        help='time each dense row and its pruned variants in one process, '
        'their forwards alternating (an A/B comparison that the drift of '
        'a shared machine cannot bias; no memory columns)',
    )
    parser.add_argument(
        '--json', help='also write the raw results to this JSON file'
    )
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.iters, args.ref_iters, args.threads, args.rounds) < 1:
        parser.error(
            '--iters, --ref-iters, --threads and --rounds must be >= 1'
        )
    if min(args.warmup, args.ref_warmup) < 0:
        parser.error('--warmup and --ref-warmup must be >= 0')
    return args


def select_rows(
    names: Optional[List[str]], impls: Optional[List[str]]
) -> List[Row]:
    rows = ROWS
    if names:
        unknown = [
            n for n in names if not any(r.key.startswith(n) for r in ROWS)
        ]
        if unknown:
            raise SystemExit(
                f'unknown rows {unknown}; rows are {[r.key for r in ROWS]}'
            )
        rows = [r for r in rows if any(r.key.startswith(n) for n in names)]
    if impls:
        rows = [r for r in rows if r.scan_impl in impls]
    if not rows:
        raise SystemExit('no row selected')
    return rows


def measure(rows: List[Row], args: argparse.Namespace) -> List[dict]:
    """Run one row, or several interleaved, in a fresh process."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        PYTHONPATH=os.pathsep.join(
            p for p in (ROOT, env.get('PYTHONPATH')) if p
        ),
    )
    ref = any(row.scan_impl == 'ref' for row in rows)
    job = dict(
        rows=[dataclasses.asdict(row) for row in rows],
        iters=args.ref_iters if ref else args.iters,
        warmup=args.ref_warmup if ref else args.warmup,
        threads=args.threads,
    )
    cmd = [sys.executable, osp.abspath(__file__), '--worker', json.dumps(job)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        error = f'timed out after {args.timeout} s'
        return [dict(key=row.key, error=error) for row in rows]
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ['(no output)']
        return [
            dict(key=row.key, error=lines[-1], wall_s=wall) for row in rows
        ]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for result in results:  # the process's time, shared by its rows
        result['wall_s'] = wall / len(rows)
    return results


def combine_rounds(runs: List[dict]) -> dict:
    """One row's result from its rounds: the median round's time, the
    largest memory, the summed row time; a failed round fails the row."""
    failed = [r for r in runs if 'error' in r]
    if failed:
        return failed[0]
    ms = statistics.median(r['ms_per_iter'] for r in runs)
    first = runs[0]
    combined = dict(
        first,
        ms_per_iter=ms,
        images_per_s=first['images_per_s'] * first['ms_per_iter'] / ms,
        wall_s=sum(r['wall_s'] for r in runs),
        rounds_ms=[round(r['ms_per_iter'], 1) for r in runs],
    )
    if 'peak_fwd_mib' in first:  # not measured for interleaved rows
        combined.update(
            peak_fwd_mib=max(r['peak_fwd_mib'] for r in runs),
            peak_rss_mib=max(r['peak_rss_mib'] for r in runs),
            exact_peak=all(r['exact_peak'] for r in runs),
        )
    return combined


def format_table(rows: List[Row], results: Dict[str, dict]) -> str:
    lines = [
        '| model | input | batch | scan | ms / iter | images/s | speed-up '
        '| peak fwd (MiB) | peak RSS (MiB) | row time (s) |',
        '|---|---|---:|---|---:|---:|---:|---:|---:|---:|',
    ]
    for row in rows:
        res = results[row.key]
        head = (
            f'| {row.label} | {row.shape[0]}x{row.shape[1]} | {row.batch} '
            f'| {row.scan_impl} |'
        )
        if 'error' in res:
            lines.append(f'{head} failed: {res["error"]} | | | | | |')
            continue
        base = results.get(row.baseline or '', {})
        speedup = (
            f'{res["images_per_s"] / base["images_per_s"]:.2f}x '
            f'vs {base["key"].rsplit("-", 1)[-1]}'
            if 'images_per_s' in base
            else ''
        )
        memory = '- | -'  # interleaved rows share a process
        if 'peak_fwd_mib' in res:
            bound = '' if res['exact_peak'] else '>= '
            memory = (
                f'{bound}{res["peak_fwd_mib"]:.0f} | {res["peak_rss_mib"]:.0f}'
            )
        lines.append(
            f'{head} {res["ms_per_iter"]:.0f} | {res["images_per_s"]:.3g} | '
            f'{speedup} | {memory} | {res["wall_s"]:.0f} |'
        )
    return '\n'.join(lines)


def main() -> None:
    args = parse_args()
    if args.worker:
        job = json.loads(args.worker)
        rows = [
            Row(**dict(r, shape=tuple(r['shape']))) for r in job.pop('rows')
        ]
        if len(rows) == 1:
            results = [run_row(rows[0], **job)]
        else:
            results = run_interleaved(rows, **job)
        print(json.dumps(results))
        return
    rows = select_rows(args.rows, args.impls)
    load_before = os.getloadavg()
    start = time.perf_counter()
    rounds: Dict[str, List[dict]] = {row.key: [] for row in rows}
    # what one process measures: a row, or a group of rows interleaved
    units = interleave_groups(rows) if args.interleave else [[r] for r in rows]
    for r in range(args.rounds):
        for unit in units[r % len(units) :] + units[: r % len(units)]:
            names = ' + '.join(row.key for row in unit)
            print(
                f'[benchmark] round {r + 1}/{args.rounds} {names} ...',
                file=sys.stderr,
                flush=True,
            )
            for res in measure(unit, args):
                rounds[res['key']].append(res)
                print(
                    f'[benchmark] {res["key"]}: '
                    + (
                        res['error']
                        if 'error' in res
                        else f'{res["ms_per_iter"]:.0f} ms / iter'
                    ),
                    file=sys.stderr,
                    flush=True,
                )
    results = {key: combine_rounds(runs) for key, runs in rounds.items()}
    total = time.perf_counter() - start
    sys.path.insert(0, ROOT)
    print(machine_line(args.threads))
    load = ', '.join(f'{x:.1f}' for x in load_before + os.getloadavg())
    mode = ', interleaved' if args.interleave else ''
    print(
        f'warm-up {args.warmup}, timed iterations {args.iters} (ref rows: '
        f'{args.ref_warmup}, {args.ref_iters}), rounds {args.rounds} '
        f'(median){mode}; total benchmark time {total:.0f} s; load '
        f'average (1, 5, 15 min) before, after: {load}'
    )
    print()
    print(format_table(rows, results))
    if args.json:
        # written aside and renamed: a stopped run leaves no half a file
        tmp = f'{args.json}.tmp'
        with open(tmp, 'w') as f:
            json.dump(
                dict(
                    machine=machine_line(args.threads),
                    load_average=load_before + os.getloadavg(),
                    total_s=total,
                    rows=[dataclasses.asdict(r) for r in rows],
                    results=results,
                    rounds=rounds,
                ),
                f,
                indent=1,
            )
        os.replace(tmp, args.json)


if __name__ == '__main__':
    main()
