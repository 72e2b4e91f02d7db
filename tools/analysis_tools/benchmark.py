"""Throughput and peak memory of backbones, detectors and segmentors (CPU).

Each row of :data:`ROWS` builds a config's backbone (with overrides such as
the paper's pruning, aligned or naive, and the scan implementation: 'cpu'
the compiled kernel, 'ref' the PyTorch reference) or a whole detector or
segmentor (random weights: end-to-end ``predict``, e.g. the ``e2e-`` rows,
Mask R-CNN and UperNet dense, with the paper's static pruning and with
DyVM's learned pruning), and times its forward in eval mode under
``torch.no_grad()`` with ``torch.utils.benchmark`` (the median of
``--iters`` forwards after ``--warmup``) in a fresh process that also
measures the peak memory; ``--rounds`` repeats every row in a rotating
order and ``--interleave`` times a dense row and its pruned variants in
one process, their forwards alternating. One markdown table is printed,
with the machine; how the numbers are taken and how to read them is in
``docs/benchmark.md``.

Example::

    python tools/analysis_tools/benchmark.py --threads 2 --iters 3
    python tools/analysis_tools/benchmark.py --rows pm-l1-224 --impls cpu
    python tools/analysis_tools/benchmark.py --rows prune- e2e-
"""

import argparse
import ctypes
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
from typing import Dict, List, Optional, Tuple

from mmssm.errors import UserError
from mmssm.utils.cli import exit_on_user_error
from mmssm.utils.fileio import atomic_write

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
        backbone (dict): Overrides merged into the (inner) backbone.
        kind (str): 'backbone', or 'detector' / 'segmentor' (an mmdet /
            mmseg model of the config, ``predict`` on the batch; the
            overrides go to its SSM backbone, inside the adapter if any).
        baseline (str, optional): The row the speed-up is relative to.
        direction_keep (float, optional): DyVM's direction gates set to
            keep this fraction of each layer's (image, direction) pairs
            (:func:`set_direction_budget`; the weights are random).
        tiny (str, optional): Build the family's tiny test arch instead
            (``mmssm.testing``; the paper's schedule becomes its
            ``TINY_PRUNE``): the rows that the tool's tests run in seconds.
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
    direction_keep: Optional[float] = None
    tiny: Optional[str] = None


def _impl_rows(key, label, config, shape, batch) -> List[Row]:
    """The kernel ('cpu', its speed-up relative to 'ref') and 'ref'."""
    return [
        Row(f'{key}-cpu', label, config, shape, batch, 'cpu',
            baseline=f'{key}-ref'),
        Row(f'{key}-ref', label, config, shape, batch, 'ref'),
    ]  # fmt: skip


def _pruning_rows(
    key, label, config, shape, batch, kind='backbone', tiny=None
):
    """Dense, the paper's schedule aligned, and the same schedule naive."""
    dense = f'{key}-dense'
    return [
        Row(dense, f'{label} dense', config, shape, batch, kind=kind,
            tiny=tiny),
        Row(f'{key}-aligned', f'{label} paper aligned', config, shape,
            batch, backbone=dict(prune_cfg='paper'), kind=kind,
            baseline=dense, tiny=tiny),
        Row(f'{key}-naive', f'{label} paper naive', config, shape, batch,
            backbone=dict(prune_cfg=dict(schedule='paper', align=False)),
            kind=kind, baseline=dense, tiny=tiny),
    ]  # fmt: skip


def _dyvm_rows(key, label, config, shape, batch):
    """Dense; DyVM's learned token pruning (rearranged, as released), its
    direction selection at a budget of 0.8, both; and the aligned
    variants of the two with token pruning (``align=True``)."""
    dense = f'{key}-dense'
    aligned = dict(type='mmssm.LearnedTokenPruner', schedule='dyvm',
                   align=True)  # fmt: skip
    variants = [
        ('tokens', 'tokens', dict(prune_cfg='dyvm'), None),
        ('dirs', 'directions 0.8', dict(direction_gate=True), 0.8),
        ('both', 'tokens + directions 0.8',
         dict(prune_cfg='dyvm', direction_gate=True), 0.8),
        ('tokens-align', 'tokens aligned', dict(prune_cfg=aligned), None),
        ('both-align', 'tokens aligned + directions 0.8',
         dict(prune_cfg=aligned, direction_gate=True), 0.8),
    ]  # fmt: skip
    return [Row(dense, f'{label} dense', config, shape, batch)] + [
        Row(f'{key}-{name}', f'{label} DyVM {text}', config, shape, batch,
            backbone=overrides, baseline=dense, direction_keep=keep)
        for name, text, overrides, keep in variants
    ]  # fmt: skip


#: The end-to-end rows of a model: (key suffix, label, the config name's
#: pruning field, direction_keep). DyVM's direction gates (random) keep
#: 0.8 of the directions, the target their direction-ratio loss trains.
E2E_VARIANTS = (
    ('dense', 'dense', '', None),
    ('paper', 'paper static', '-prune', None),
    ('dyvm', 'DyVM', '-dyvm', 0.8),
    ('dyvm-align', 'DyVM aligned', '-dyvm-align', 0.8),
)


def _e2e_rows(key, label, config, shape, kind, tiny=None):
    """End-to-end ``predict`` of a detector or segmentor, one image per
    forward: the dense config, the paper's static pruning (``-prune``,
    aligned) and DyVM's learned pruning, rearranged (``-dyvm``) and
    aligned (``-dyvm-align``), each its config as written (``config``
    has ``{}`` for the pruning field of the name)."""
    dense = f'{key}-dense'
    return [
        Row(f'{key}-{name}', f'{label} {text}', config.format(field), shape,
            1, kind=kind, baseline=None if name == 'dense' else dense,
            direction_keep=keep, tiny=tiny)
        for name, text, field, keep in E2E_VARIANTS
    ]  # fmt: skip


PM = 'configs/plainmamba/plainmamba-{}_8xb64_in1k.py'
VIM_S = 'configs/vim/vim-s_8xb64_in1k.py'
MASK_RCNN = 'configs/mask_rcnn/mask-rcnn_{}{{}}_adapter-fpn_8xb2-1x_coco.py'
UPERNET = 'configs/upernet/upernet_{}{{}}_adapter_8xb2-160k_ade20k-512x512.py'
#: (key, label, config name) of the end-to-end rows' backbones
E2E_BACKBONES = (
    ('pm-l1', 'PlainMamba-L1', 'plainmamba-l1'),
    ('pm-l3', 'PlainMamba-L3', 'plainmamba-l3'),
    ('vim-s', 'Vim-S', 'vim-s'),
)
DET = (800, 1333)
ROWS: List[Row] = [
    # the compiled scan kernel against the reference
    *_impl_rows('pm-l1-224', 'PlainMamba-L1', PM.format('l1'), (224, 224), 8),
    *_impl_rows('pm-l3-224', 'PlainMamba-L3', PM.format('l3'), (224, 224), 8),
    *_impl_rows('vim-s-224', 'Vim-S', VIM_S, (224, 224), 8),
    *_impl_rows('pm-l1-det', 'PlainMamba-L1', PM.format('l1'), DET, 1),
    # token pruning: dense, aligned, naive
    *_pruning_rows('prune-vim-s-224', 'Vim-S', VIM_S, (224, 224), 8),
    *_pruning_rows('prune-pm-l3-224', 'PlainMamba-L3', PM.format('l3'),
                   (224, 224), 8),
    *_pruning_rows('prune-pm-l1-det', 'PlainMamba-L1', PM.format('l1'),
                   DET, 1),
    # DyVM: learned tokens, directions, both; rearranged and aligned
    *_dyvm_rows('dyvm-vim-s-224', 'Vim-S', VIM_S, (224, 224), 8),
    *_dyvm_rows('dyvm-pm-l3-224', 'PlainMamba-L3', PM.format('l3'),
                (224, 224), 8),
    # the tool's own tests: the tiny test arch, seconds per row
    *_pruning_rows('test-tiny-vim', 'tiny Vim', VIM_S, (64, 64), 2,
                   tiny='vim'),
    *_e2e_rows('test-tiny-e2e-maskrcnn', 'tiny Mask R-CNN',
               MASK_RCNN.format('plainmamba-l1'), (64, 64), 'detector',
               tiny='plainmamba'),
    *_e2e_rows('test-tiny-e2e-upernet', 'tiny UperNet',
               UPERNET.format('vim-s'), (64, 64), 'segmentor', tiny='vim'),
    # end to end with the adapter (--rows e2e-): Mask R-CNN and UperNet,
    # dense, the paper's static pruning, DyVM rearranged and aligned
    *[row for key, label, name in E2E_BACKBONES
      for row in _e2e_rows(f'e2e-maskrcnn-{key}', f'Mask R-CNN {label}',
                           MASK_RCNN.format(name), DET, 'detector')],
    *[row for key, label, name in E2E_BACKBONES
      for row in _e2e_rows(f'e2e-upernet-{key}', f'UperNet {label}',
                           UPERNET.format(name), (512, 512), 'segmentor')],
]  # fmt: skip


# --------------------------------------------------------------------------
# The worker: rows built and timed in one process.
# --------------------------------------------------------------------------
def build(row: Row):
    """The module that the row runs on its input batch: the config's
    backbone with the row's overrides, or its detector / segmentor
    (:func:`build_task_model`); DyVM's direction gates, if the row sets
    ``direction_keep``, at that budget."""
    import torch
    from mmengine.config import Config
    from mmengine.registry import MODELS

    import mmssm.models  # noqa: F401

    cfg = Config.fromfile(osp.join(ROOT, row.config))
    if row.kind == 'backbone':
        backbone = dict(cfg.model.get('backbone', cfg.model), **row.backbone)
        if row.tiny:
            from mmssm.testing.models import shrink_prune_cfg, tiny_arch

            prune_cfg = shrink_prune_cfg(backbone.get('prune_cfg'))
            backbone.update(
                arch=tiny_arch(row.tiny), img_size=64, prune_cfg=prune_cfg
            )
        model = MODELS.build(dict(backbone, scan_impl=row.scan_impl))
    else:
        model = build_task_model(cfg, row)
    if row.direction_keep is not None:
        # a detector / segmentor (one image per forward) is calibrated on
        # 4 images: a quantile over one image's 2 (Vim) or 4 directions
        # cannot hit the budget; at the row's shape, because the logits
        # move with the resolution (a threshold set at 256 px ran every
        # direction of Vim-S's UperNet at 512 px)
        batch = row.batch if row.kind == 'backbone' else max(row.batch, 4)
        x = torch.randn(
            batch, 3, *row.shape, generator=torch.Generator().manual_seed(1)
        )
        set_direction_budget(model.eval(), x, row.direction_keep)
    return model


#: The toolbox of each task kind: its default scope and data sample class.
TASKS = {
    'detector': ('mmdet', 'mmdet.structures', 'DetDataSample'),
    'segmentor': ('mmseg', 'mmseg.structures', 'SegDataSample'),
}


def build_task_model(cfg, row: Row):
    """The config's mmdet detector or mmseg segmentor (random weights,
    SyncBN as BN), wrapped to run ``predict`` on an image batch with the
    metas of unresized images. The row's overrides (and, for a tiny row,
    :func:`shrink_task_model`) go to its SSM backbone."""
    import importlib

    import torch
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import DefaultScope

    if row.kind not in TASKS:
        raise UserError(f'row {row.key}: unknown kind {row.kind!r}')
    scope, structures, sample_name = TASKS[row.kind]
    if cfg.get('default_scope') != scope:
        raise UserError(
            f'row {row.key} ({row.kind}): {row.config} is not an {scope} '
            f'config (default_scope {cfg.get("default_scope")!r})'
        )
    registry = importlib.import_module(f'{scope}.registry').MODELS
    sample_cls = getattr(importlib.import_module(structures), sample_name)
    backbone = cfg.model.backbone
    if backbone.type == 'mmssm.ViTAdapter':
        backbone = backbone.backbone
    backbone.update(row.backbone, scan_impl=row.scan_impl, init_cfg=None)
    if row.tiny:
        shrink_task_model(cfg, row.tiny, row.shape)
    # the toolbox's scope while building only (the tests build in-process)
    with DefaultScope.overwrite_default_scope(scope):
        task_model = revert_sync_batchnorm(registry.build(cfg.model))

    class Predict(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = task_model

        def forward(self, x):
            h, w = x.shape[-2:]
            meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                        scale_factor=(1.0, 1.0),
                        padding_size=[0, 0, 0, 0])  # fmt: skip
            samples = [sample_cls(metainfo=meta) for _ in x]
            return self.model.predict(x, samples)

    return Predict()


def shrink_task_model(cfg, family: str, shape: Tuple[int, int]) -> None:
    """A detection / segmentation config's model on the family's tiny
    test arch (the tool's tests), in place: its 4 layers in 2 adapter
    interactions, the paper's schedule as ``TINY_PRUNE``, a learned
    pruner's steps after ``TINY_PRUNE``'s layers, the neck and heads
    reading the tiny channels, 100 proposals per image."""
    from mmssm.testing.models import TINY_PRUNE, shrink_prune_cfg, tiny_arch

    arch = tiny_arch(family)
    model = cfg.model
    backbone = model.backbone
    if backbone.type == 'mmssm.ViTAdapter':
        backbone.update(
            interaction_indexes=[[0, 1], [2, 3]],
            conv_inplane=16,
            deform_num_heads=2,
        )
        backbone = backbone.backbone
    prune_cfg = backbone.get('prune_cfg')
    if isinstance(prune_cfg, dict) and 'layers' in prune_cfg:
        prune_cfg = dict(prune_cfg, layers=TINY_PRUNE['layers'])
    backbone.update(
        arch=arch, img_size=shape, prune_cfg=shrink_prune_cfg(prune_cfg)
    )
    channels = arch['embed_dims']
    if 'neck' in model:
        model.neck.in_channels = [channels] * 4
    if 'rpn' in model.get('test_cfg', {}):  # fewer RoIs for the box head
        model.test_cfg.rpn.max_per_img = 100
    for head in ('decode_head', 'auxiliary_head'):
        if head in model:
            multi = isinstance(model[head].in_channels, (list, tuple))
            model[head].in_channels = [channels] * 4 if multi else channels


def set_direction_budget(model, x, keep: float) -> None:
    """Direction gates of random weights that keep about ``keep`` of each
    layer's (image, direction) pairs, images differing.

    Each gate gets random weights (bias 0), then, in one forward on ``x``,
    its eval threshold at the ``1 - keep`` quantile of its logits on the
    inputs it sees (a pre-hook, so the layers after it run with its bits).
    """
    import torch

    gates = [m.direction_gate for m in model.modules()
             if getattr(m, 'direction_gate', None) is not None]  # fmt: skip
    if not gates:
        raise UserError('direction_keep needs direction_gate=True')

    def calibrate(gate, args):
        logits = gate.fc(gate.pool(*args))
        gate.threshold_logit = float(torch.quantile(logits.float(), 1 - keep))

    handles = []
    with torch.no_grad():
        for gate in gates:
            torch.nn.init.normal_(
                gate.fc.weight, std=gate.fc.in_features**-0.5
            )
            torch.nn.init.zeros_(gate.fc.bias)
            handles.append(gate.register_forward_pre_hook(calibrate))
        try:
            model(x)
        finally:
            for handle in handles:
                handle.remove()


def _status_kb(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{field} is not in /proc/self/status')


def _release_freed_memory() -> None:
    """Return the heap's free pages to the system (glibc's malloc_trim):
    what building a row and calibrating its gates (a 4-image forward)
    freed would otherwise stay resident, counted in the RSS before the
    timed forwards, and lower the row's 'peak fwd'. Other C libraries have
    no such call; their 'peak fwd' may then be low after a calibration."""
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def run_rows(
    rows: List[Row], iters: int, warmup: int, threads: int
) -> List[dict]:
    """Build the rows and time their forwards with ``torch.utils.benchmark``.

    Forward ``i`` of every row runs before forward ``i + 1`` of any, in an
    order rotating with ``i``, so that the rows share whatever the machine
    does meanwhile. The peak memory (MiB) is measured for a single row.
    """
    import torch
    from torch.utils.benchmark import Measurement
    from torch.utils.benchmark.utils.common import TaskSpec

    torch.set_num_threads(threads)
    inputs, models, specs = [], [], []
    for row in rows:
        torch.manual_seed(0)
        models.append(build(row).eval())
        inputs.append(torch.randn(row.batch, 3, *row.shape))
        specs.append(
            TaskSpec('model(x)', 'pass', label=row.key, num_threads=threads)
        )
    gc.collect()
    _release_freed_memory()
    rss_before = _status_kb('VmRSS')
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    exact = _reset_peak_rss()
    runs: List[List[Measurement]] = [[] for _ in rows]
    order = list(range(len(rows)))
    # One forward at a time, timed on Timer's clock: Timer.timeit(1) would
    # add two hidden warm-up forwards to each, tripling an interleaved run.
    with torch.no_grad():
        for i in range(warmup + iters):
            shift = i % len(order)
            for j in order[shift:] + order[:shift]:
                start = time.perf_counter()
                models[j](inputs[j])
                elapsed = time.perf_counter() - start
                if i >= warmup:
                    runs[j].append(Measurement(1, [elapsed], specs[j]))
    results = []
    for row, model, measurements in zip(rows, models, runs):
        (m,) = Measurement.merge(measurements)
        if row.direction_keep is not None:
            from mmssm.utils.flops import measure_direction_keep

            # the bits of the last timed forward (no forward is re-run)
            kept = measure_direction_keep(model, [None], lambda *_: None)
        results.append(
            dict(
                key=row.key,
                iters=len(m.times),
                warmup=warmup,
                # the median forward: one slow forward does not move it
                ms_per_iter=1e3 * m.median,
                iqr_ms=1e3 * m.iqr,
                images_per_s=row.batch / m.median,
                ms_all=[round(1e3 * t, 1) for t in m.times],
                params_m=sum(p.numel() for p in model.parameters()) / 1e6,
            )
        )
        if row.direction_keep is not None:
            results[-1]['direction_keep'] = kept
    if len(rows) == 1:  # rows sharing a process share its memory
        if exact:
            peak_fwd = _status_kb('VmHWM') - rss_before
        else:  # a lower bound
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak_fwd = maxrss - maxrss_before
        results[0].update(
            peak_fwd_mib=peak_fwd / 1024,
            peak_rss_mib=_status_kb('VmHWM') / 1024,
            exact_peak=exact,
        )
    return results


# --------------------------------------------------------------------------
# The driver.
# --------------------------------------------------------------------------
def machine_line(threads: int) -> str:
    """CPU, threads, torch version and whether mmssm._ext is built."""
    import torch

    from mmssm.ops import ext_status

    cpu = platform.processor() or platform.machine()
    if osp.isfile('/proc/cpuinfo'):
        with open('/proc/cpuinfo') as f:
            names = [ln for ln in f if ln.startswith('model name')]
        cpu = names[0].split(':', 1)[1].strip() if names else cpu
    return (
        f'machine: {cpu} ({os.cpu_count()} logical CPUs visible), '
        f'{threads} threads, torch {torch.__version__}, '
        f'Python {platform.python_version()}, mmssm._ext {ext_status()}'
    )


def parse_args(argv=None) -> argparse.Namespace:
    keys = sorted({r.key.rsplit('-', 1)[0] for r in ROWS})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add(
        '--rows',
        nargs='+',
        help=f'row keys or their prefixes ({", ".join(keys)}; with the '
        'suffix, e.g. pm-l1-224-cpu, one row). Defaults to all.',
    )
    add(
        '--impls',
        nargs='+',
        help="keep only rows with these scan_impl (e.g. 'cpu')",
    )
    add('--iters', type=int, default=3, help='timed forwards (3)')
    add('--warmup', type=int, default=1, help='untimed forwards first (1)')
    add(
        '--ref-iters',
        type=int,
        default=1,
        help="timed forwards of 'ref' rows (1)",
    )
    add(
        '--ref-warmup',
        type=int,
        default=0,
        help="untimed forwards of 'ref' rows (0)",
    )
    add(
        '--threads',
        type=int,
        default=2,
        help='torch/OpenMP threads per row (2)',
    )
    add(
        '--timeout',
        type=float,
        default=3600,
        help='seconds allowed per process (3600)',
    )
    add(
        '--rounds',
        type=int,
        default=1,
        help='passes over the rows, in a rotating order; the median round '
        'is reported (1)',
    )
    add(
        '--interleave',
        action='store_true',
        help='time each dense row and its pruned variants in one process, '
        'their forwards alternating (no memory columns)',
    )
    add('--json', help='also write the raw results to this JSON file')
    add('--worker', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)  # fmt: skip
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
    """The rows whose key is one of ``names`` or, for a name that is no
    row's whole key, starts with it; of ``impls``."""
    keys = {r.key for r in ROWS}

    def chosen(key: str, name: str) -> bool:
        return key == name if name in keys else key.startswith(name)

    unknown = [n for n in names or [] if not any(
        chosen(r.key, n) for r in ROWS)]  # fmt: skip
    if unknown:
        raise UserError(
            f'unknown rows {unknown}; rows are {[r.key for r in ROWS]}'
        )
    rows = [
        r
        for r in ROWS
        if (not names or any(chosen(r.key, n) for n in names))
        and (not impls or r.scan_impl in impls)
    ]
    if not rows:
        raise UserError('no row selected')
    return rows


def interleave_groups(rows: List[Row]) -> List[List[Row]]:
    """Rows grouped with their baseline (dense with its pruned variants)."""
    groups: Dict[str, List[Row]] = {}
    for row in rows:
        groups.setdefault(row.baseline or row.key, []).append(row)
    return list(groups.values())


def measure(rows: List[Row], args: argparse.Namespace) -> List[dict]:
    """Run one row, or several interleaved, in a fresh process."""
    threads = str(args.threads)
    path = os.pathsep.join(
        p for p in (ROOT, os.environ.get('PYTHONPATH')) if p
    )
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               PYTHONPATH=path)  # fmt: skip
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
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              timeout=args.timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        error = f'timed out after {args.timeout} s'
        return [dict(key=row.key, error=error) for row in rows]
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        error = (proc.stderr.strip().splitlines() or ['(no output)'])[-1]
        return [dict(key=r.key, error=error, wall_s=wall) for r in rows]
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
        '| peak fwd (MiB) | peak RSS (MiB) | row time (s) | directions |',
        '|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for row in rows:
        res = results[row.key]
        head = (
            f'| {row.label} | {row.shape[0]}x{row.shape[1]} | {row.batch} '
            f'| {row.scan_impl} |'
        )
        if 'error' in res:
            lines.append(f'{head} failed: {res["error"]} | | | | | | |')
            continue
        base = results.get(row.baseline or '', {})
        speedup = ''
        if 'images_per_s' in base:
            ratio = res['images_per_s'] / base['images_per_s']
            speedup = f'{ratio:.2f}x vs {base["key"].rsplit("-", 1)[-1]}'
        memory = '- | -'  # interleaved rows share a process
        if 'peak_fwd_mib' in res:
            bound = '' if res['exact_peak'] else '>= '
            memory = (
                f'{bound}{res["peak_fwd_mib"]:.0f} | {res["peak_rss_mib"]:.0f}'
            )
        # the fraction of directions that DyVM's gates ran (timed input)
        dirs = res.get('direction_keep')
        dirs = '' if dirs is None else f'{dirs:.2f}'
        lines.append(
            f'{head} {res["ms_per_iter"]:.0f} | {res["images_per_s"]:.3g} | '
            f'{speedup} | {memory} | {res["wall_s"]:.0f} | {dirs} |'
        )
    return '\n'.join(lines)


def progress(res: dict) -> str:
    """A row's result as it is measured (an interrupted run keeps what
    it printed): time, peak memory, kept directions, load average."""
    parts = [f'{res["ms_per_iter"]:.0f} ms / iter']
    if 'peak_fwd_mib' in res:
        parts.append(f'peak fwd {res["peak_fwd_mib"]:.0f} MiB')
    if 'direction_keep' in res:
        parts.append(f'directions {res["direction_keep"]:.2f}')
    load = ' '.join(f'{x:.1f}' for x in os.getloadavg())
    return ', '.join(parts + [f'load {load}'])


def write_json(path: str, report: dict) -> None:
    """Written whole or not at all (a stopped run leaves no half a file)."""
    atomic_write(path, json.dumps(report, indent=1))


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        rows = [
            Row(**dict(r, shape=tuple(r['shape']))) for r in job.pop('rows')
        ]
        print(json.dumps(run_rows(rows, **job)))
        return
    rows = select_rows(args.rows, args.impls)
    load_before = os.getloadavg()
    start = time.perf_counter()
    rounds: Dict[str, List[dict]] = {row.key: [] for row in rows}
    # what one process measures: a row, or a group of rows interleaved
    units = interleave_groups(rows) if args.interleave else [[r] for r in rows]
    for r in range(args.rounds):
        # round r starts at unit r: no row is always measured first
        for unit in units[r % len(units) :] + units[: r % len(units)]:
            names = ' + '.join(row.key for row in unit)
            print(f'[benchmark] round {r + 1}/{args.rounds} {names} ...',
                  file=sys.stderr, flush=True)  # fmt: skip
            for res in measure(unit, args):
                rounds[res['key']].append(res)
                done = res.get('error') or progress(res)
                print(f'[benchmark] {res["key"]}: {done}', file=sys.stderr,
                      flush=True)  # fmt: skip
    results = {key: combine_rounds(runs) for key, runs in rounds.items()}
    total = time.perf_counter() - start
    machine = machine_line(args.threads)
    load = load_before + os.getloadavg()
    mode = ', interleaved' if args.interleave else ''
    print(machine)
    print(
        f'warm-up {args.warmup}, timed iterations {args.iters} (ref rows: '
        f'{args.ref_warmup}, {args.ref_iters}), rounds {args.rounds} '
        f'(median){mode}; total benchmark time {total:.0f} s; load '
        f'average (1, 5, 15 min) before, after: '
        + ', '.join(f'{x:.1f}' for x in load)
    )
    print()
    print(format_table(rows, results))
    if args.json:
        write_json(
            args.json,
            dict(
                machine=machine,
                load_average=load,
                total_s=total,
                rows=[dataclasses.asdict(r) for r in rows],
                results=results,
                rounds=rounds,
            ),
        )


if __name__ == '__main__':
    main()
