"""Zero-shot token pruning of small SSM classifiers, trained on the CPU.

The central claim of "Exploring Token Pruning in Vision State Space Models"
at a small scale: for a small PlainMamba and a small Vim, the tool trains
the dense classifier (mmpretrain's ``ImageClassifier`` with the backbone's
pooled feature and a linear head, :func:`mmssm.models.build_classifier`) on
the synthetic glyph set of :mod:`mmssm.datasets.synthetic_cls` (mmengine's
``OptimWrapper`` from ``mmssm.SSMOptimWrapperConstructor``, a linear
warm-up and a cosine schedule), then evaluates the same weights without
fine-tuning, dense and pruned after about 1/3 and 2/3 of the depth (naive,
aligned 'prev', aligned 'null'), for each ``--keep`` and each importance score
(``--metrics``: the registered scorers 'clip', 'l1', 'l2', 'raw', and the
reference selections 'oracle' and 'random'), and prints one markdown table
(also written to ``--out`` as JSON). With ``--finetune-epochs``, each pruned
variant (and the dense model, for reference) is then fine-tuned from the
dense weights for that budget, with the same training code, and a second
table puts its zero-shot and fine-tuned top-1 side by side (the paper's
Figure 2 at a small scale). What it measures and why is in
``docs/fidelity.md``.

Example (about 10 minutes on a quiet 2-core machine)::

    python tools/analysis_tools/pruning_fidelity.py --out fidelity.json
    python tools/analysis_tools/pruning_fidelity.py --models vim \\
        --keep 0.6 0.4 --metrics clip l1 --epochs 10
"""

import argparse
import json
import os
import os.path as osp
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from mmengine.logging import MMLogger
from mmengine.optim import CosineAnnealingLR, LinearLR, OptimWrapper
from torch import Tensor, nn

from mmssm.datasets.synthetic_cls import (
    CLS_CLASSES,
    GENERATOR_VERSION,
    make_synthetic_cls,
)
from mmssm.engine.optimizers import SSMOptimWrapperConstructor
from mmssm.models.classifiers import build_classifier
from mmssm.models.pruning import SSM_SCORES, GivenScore
from mmssm.utils.fileio import atomic_open, atomic_write

MODELS = ('plainmamba', 'vim')

#: The zero-shot variants: the name in the table and the prune_cfg keys
#: added to the schedule (None: dense).
VARIANTS = {
    'dense': None,
    'naive': dict(align=False),
    'prev': dict(align=True, gap_mode='prev'),
    'null': dict(align=True, gap_mode='null'),
}

#: Reference selections: 'oracle' keeps the patches that the object covers
#: most (the 'given' scorer), 'random' a random subset.
REFERENCES = ('oracle', 'random')

#: A patch is an object token if the object covers this much of it.
OBJECT_COVERAGE = 0.25

PATCH = 16  # patch size of both models
MEAN, STD = 127.5, 64.0  # normalisation of the uint8 images


def backbone_cfg(
    model: str, embed_dims: int, depth: int, image_size: int
) -> dict:
    """The dense backbone config of a small model: ``image_size / 16``
    patch tokens a side (PlainMamba through its stride-16 stem without the
    3x3 convs, Vim through a 16 x 16 patch conv, with its class token)."""
    common = dict(embed_dims=embed_dims, num_layers=depth, d_state=8)
    if model == 'plainmamba':
        arch = dict(common, num_convs=0, dw_layers=[], expand=2, conv_size=3)
        return dict(type='mmssm.PlainMamba', arch=arch, img_size=image_size)
    if model == 'vim':
        arch = dict(
            common,
            patch_size=PATCH,
            stride=PATCH,
            expand=2,
            d_conv=4,
            cls_token='middle',
        )
        return dict(type='mmssm.Vim', arch=arch, img_size=image_size)
    raise ValueError(f'model must be one of {MODELS}, got {model!r}')


def schedule(depth: int, keep: float) -> dict:
    """Two steps after about 1/3 and 2/3 of ``depth`` layers, keeping
    ``keep`` of the tokens after the last one: ``layers`` (1-based) and
    ``keep_ratios`` of a ``prune_cfg``."""
    layers = (max(1, round(depth / 3)), max(2, round(2 * depth / 3)))
    if not layers[0] < layers[1] <= depth - 1:
        raise ValueError(f'depth must be >= 3 to prune twice, got {depth}')
    ratio = round(keep ** (1 / len(layers)), 6)
    return dict(layers=layers, keep_ratios=(ratio,) * len(layers))


def scorer_cfg(metric: str, seed: int):
    """The pruner's ``scorer`` for a metric of ``--metrics``."""
    if metric == 'oracle':
        return 'given'  # the scores are set before each forward
    if metric == 'random':
        return dict(type='random', seed=seed)
    return metric


def normalise(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float32, about zero mean and unit std."""
    return (images.float() - MEAN) / STD


def tokens_kept(model: nn.Module, images: Tensor) -> Tuple[int, int]:
    """Patch tokens kept after the last pruning step, and all of them
    (Vim's class token, never pruned, not counted)."""
    with torch.no_grad():
        state = model.backbone.init_tokens(normalise(images[:1]))
    total = state.hw[0] * state.hw[1]
    kept = total
    for step in range(len(model.backbone.pruner.layers)):
        kept = model.backbone.pruner.num_keep(step, kept)
    return kept, total


def build_optim_wrapper(model: nn.Module, lr: float) -> OptimWrapper:
    """AdamW with gradients clipped at 1 and no weight decay on norms,
    biases and the parameters that the backbones tag (the project's
    optimizer constructor)."""
    optimizer = dict(
        type='AdamW', lr=lr, betas=(0.9, 0.999), weight_decay=0.05
    )
    constructor = SSMOptimWrapperConstructor(
        dict(
            type='OptimWrapper',
            optimizer=optimizer,
            clip_grad=dict(max_norm=1.0),
        ),
        dict(norm_decay_mult=0.0, bias_decay_mult=0.0),
    )
    return constructor(model)


def train(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    args: argparse.Namespace,
) -> List[float]:
    """Train in place (:func:`build_optim_wrapper`, a linear warm-up and
    a cosine decay to 1% of ``args.lr``, random horizontal flips); returns
    the mean loss of each epoch."""
    gen = torch.Generator().manual_seed(args.seed)
    num = images.shape[0]
    per_epoch = max(1, num // args.batch_size)
    total = args.epochs * per_epoch
    warmup = max(1, min(total // 10, 2 * per_epoch))
    optim_wrapper = build_optim_wrapper(model, args.lr)
    schedulers = [
        LinearLR(
            optim_wrapper, start_factor=1 / warmup, by_epoch=False, end=warmup
        ),
        CosineAnnealingLR(
            optim_wrapper,
            T_max=max(1, total - warmup),
            eta_min=0.01 * args.lr,
            by_epoch=False,
            begin=warmup,
            end=max(total, warmup + 1),
        ),
    ]
    model.train()
    losses = []
    for epoch in range(args.epochs):
        order = torch.randperm(num, generator=gen)
        running = 0.0
        for b in range(per_epoch):
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            x = normalise(images[idx])
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), labels[idx])
            optim_wrapper.update_params(loss)
            for scheduler in schedulers:
                scheduler.step()
            running += float(loss.detach()) * len(idx)
            step = epoch * per_epoch + b + 1
            if args.log_every and step % args.log_every == 0:
                print(f'  epoch {epoch + 1} step {step}/{total} loss '
                      f'{float(loss.detach()):.3f}', flush=True)  # fmt: skip
        losses.append(running / min(num, per_epoch * args.batch_size))
    return losses


def patch_coverage(masks: Tensor, grid: Tuple[int, int]) -> Tensor:
    """(N, h * w) fraction of each patch that the object covers, from the
    (N, H, W) uint8 coverage, zero-padded at the bottom and right to the
    grid (as the models pad the images); patches in raster order."""
    m = masks.float()[:, None] / 255
    pad_h = grid[0] * PATCH - m.shape[-2]
    pad_w = grid[1] * PATCH - m.shape[-1]
    m = F.pad(m, (0, max(pad_w, 0), 0, max(pad_h, 0)))
    m = m[..., : grid[0] * PATCH, : grid[1] * PATCH]
    return F.avg_pool2d(m, PATCH).flatten(1)


def oracle_scores(
    coverage: Tensor, cls_index: Optional[int], generator: torch.Generator
) -> Tensor:
    """(B, L) scores of the full sequence for the 'given' scorer: each
    patch's coverage, ties (the background) broken at random; a class
    token (never pruned) scores 0."""
    scores = coverage + 1e-3 * torch.rand(coverage.shape, generator=generator)
    if cls_index is not None:
        zero = scores.new_zeros(scores.shape[0], 1)
        parts = [scores[:, :cls_index], zero, scores[:, cls_index:]]
        scores = torch.cat(parts, 1)
    return scores


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    coverage: Tensor,
    batch_size: int,
    seed: int = 0,
) -> Tuple[float, float]:
    """Top-1 (%) in eval mode, and the object tokens kept: the patches
    covered for at least :data:`OBJECT_COVERAGE` that the last pruning step
    keeps (% of them, averaged over the images; read by a step hook). A
    'given' scorer gets :func:`oracle_scores` of ``coverage``."""
    model.eval()
    pruner = model.backbone.pruner
    last = {}
    handle = None
    if pruner is not None:
        handle = pruner.register_step_hook(
            lambda p, step, before, after, scores: last.update(
                kept=after.patch_kept_mask().flatten(1)
            )
        )
    generator = torch.Generator().manual_seed(seed)
    correct, recall = 0, 0.0
    try:
        for b in range(0, images.shape[0], batch_size):
            x = normalise(images[b : b + batch_size])
            cov = coverage[b : b + batch_size]
            if pruner is not None and isinstance(pruner.scorer, GivenScore):
                cls_index = model.backbone.init_tokens(x[:1]).cls_index
                pruner.scorer.scores = oracle_scores(cov, cls_index, generator)
            logits = model(x)
            correct += int(
                (logits.argmax(1) == labels[b : b + batch_size]).sum()
            )
            obj = cov >= OBJECT_COVERAGE
            kept = last.pop('kept', torch.ones_like(obj))
            recall += float(
                ((kept & obj).sum(1) / obj.sum(1).clamp(min=1)).sum()
            )
    finally:
        if handle is not None:
            handle.remove()
    num = max(images.shape[0], 1)
    return 100.0 * correct / num, 100.0 * recall / num


def train_settings(model_name: str, args: argparse.Namespace) -> dict:
    """Everything that the trained dense weights depend on."""
    keys = ('seed', 'epochs', 'num_train', 'image_size', 'embed_dims',
            'depth', 'batch_size', 'lr', 'threads')  # fmt: skip
    return dict(
        model=model_name,
        generator_version=GENERATOR_VERSION,
        **{k: getattr(args, k) for k in keys},
    )


def load_trained(path: Optional[str], settings: dict) -> Optional[dict]:
    """A saved trained model, if ``path`` holds one of these settings."""
    if not path or not osp.isfile(path):
        return None
    saved = torch.load(path, map_location='cpu', weights_only=True)
    if saved.get('settings') != settings or 'state_dict' not in saved:
        print(f'{path} holds other settings: training again')
        return None
    return saved


def train_or_load(
    name: str, dense: nn.Module, args: argparse.Namespace, data: dict
) -> dict:
    """Train the dense model, or load it from ``--work-dir``; returns the
    losses and the training times."""
    settings = train_settings(name, args)
    ckpt = args.work_dir and osp.join(args.work_dir, f'{name}_dense.pth')
    saved = load_trained(ckpt, settings)
    if saved is not None:
        dense.load_state_dict(saved['state_dict'], strict=True)
        print(f'  loaded the trained model from {ckpt}', flush=True)
        return dict(saved, loaded=True)
    print(f'  training {args.epochs} epochs', flush=True)
    start, start_cpu = time.perf_counter(), time.process_time()
    losses = train(dense, *data['train'], args)
    saved = dict(
        settings=settings,
        state_dict=dense.state_dict(),
        train_losses=losses,
        train_time_s=time.perf_counter() - start,
        train_cpu_s=time.process_time() - start_cpu,
    )
    if ckpt:
        os.makedirs(args.work_dir, exist_ok=True)
        with atomic_open(ckpt) as f:
            torch.save(saved, f)
    return dict(saved, loaded=False)


#: Metrics whose pruned models can be fine-tuned: the scorers that score a
#: training batch by themselves ('oracle' needs the coverage of each image
#: set before each forward, which only the evaluation does).
FINETUNE_METRICS = SSM_SCORES + ('random',)


def finetune(
    model: nn.Module,
    data: Dict[str, Tuple[Tensor, ...]],
    test: tuple,
    args: argparse.Namespace,
) -> Tuple[float, float]:
    """Fine-tune ``model`` in place for ``--finetune-epochs`` at
    ``--finetune-lr`` (:func:`train`: the dense training's optimizer,
    schedule and augmentation; a pruned model prunes in training too), then
    evaluate it; returns the top-1 (%) and the CPU seconds it took."""
    ft_args = argparse.Namespace(
        **dict(vars(args), epochs=args.finetune_epochs, lr=args.finetune_lr)
    )
    start = time.process_time()
    train(model, *data['train'], ft_args)
    top1, _ = evaluate(model, *test, seed=args.seed)
    return top1, time.process_time() - start


def run_model(
    name: str, args: argparse.Namespace, data: Dict[str, Tuple[Tensor, ...]]
) -> dict:
    """Train one dense model and evaluate its zero-shot pruned variants:
    ``dense`` (top-1 %) and ``pruned``, one entry per (keep, metric)."""
    torch.manual_seed(args.seed)
    cfg = backbone_cfg(name, args.embed_dims, args.depth, args.image_size)
    num_classes = len(CLS_CLASSES)
    dense = build_classifier(cfg, num_classes)
    params = sum(p.numel() for p in dense.parameters())
    print(f'{name}: {params / 1e3:.0f}k parameters', flush=True)
    trained = train_or_load(name, dense, args, data)
    losses = trained['train_losses']
    state_dict = dense.state_dict()
    images, labels, masks = data['test']
    # eval mode first: a training-mode forward would move the BN statistics
    with torch.no_grad():
        grid = dense.eval().backbone.init_tokens(normalise(images[:1])).hw
    test = (images, labels, patch_coverage(masks, grid), args.batch_size)
    start = time.perf_counter()
    dense_top1, _ = evaluate(dense, *test)
    cpu = trained.get('train_cpu_s')  # older files did not record it
    result = dict(
        params=params,
        loaded=trained['loaded'],
        train_time_s=round(trained['train_time_s'], 1),
        train_cpu_s=None if cpu is None else round(cpu, 1),
        train_losses=[round(v, 4) for v in losses],
        dense=dense_top1,
        pruned=[],
    )
    how = f'trained in {result["train_time_s"]:.0f} s'
    if trained['loaded']:
        how = f'loaded ({how})'
    print(f'  {how}, final loss {losses[-1]:.3f}; dense top-1 '
          f'{dense_top1:.1f}', flush=True)  # fmt: skip
    finetune_cpu = 0.0
    if args.finetune_epochs:
        # the dense model trained for the same budget: what more training
        # alone gives
        model = build_classifier(cfg, num_classes)
        model.load_state_dict(state_dict, strict=True)
        result['dense_ft'], cpu = finetune(model, data, test, args)
        finetune_cpu += cpu
        print(f'  dense fine-tuned: top-1 {result["dense_ft"]:.1f}',
              flush=True)  # fmt: skip
    for keep in args.keep:
        sched = schedule(args.depth, keep)
        for metric in args.metrics:
            entry = dict(keep=keep, metric=metric, **sched)
            for variant, extra in VARIANTS.items():
                if extra is None:
                    continue
                prune_cfg = dict(
                    sched, scorer=scorer_cfg(metric, args.seed), **extra
                )
                model = build_classifier(
                    dict(cfg, prune_cfg=prune_cfg), num_classes
                )
                model.load_state_dict(state_dict, strict=True)
                top1, recall = evaluate(model, *test, seed=args.seed)
                entry[variant] = top1
                entry[f'{variant}_object_kept'] = recall
                if args.finetune_epochs and metric in FINETUNE_METRICS:
                    entry[f'{variant}_ft'], cpu = finetune(
                        model, data, test, args
                    )
                    finetune_cpu += cpu
                    print(f'  {metric} keep {keep} {variant}: zero-shot '
                          f'{top1:.1f}, fine-tuned '
                          f'{entry[f"{variant}_ft"]:.1f}',
                          flush=True)  # fmt: skip
            kept, total = tokens_kept(model, images)
            entry.update(tokens_kept=kept, tokens=total)
            result['pruned'].append(entry)
    result['eval_time_s'] = round(time.perf_counter() - start, 1)
    if args.finetune_epochs:
        result['finetune_cpu_s'] = round(finetune_cpu, 1)
    return result


def table(results: Dict[str, dict]) -> str:
    """The markdown table of the results."""
    lines = [
        "| model | metric | dense top-1 | naive | aligned 'prev' "
        "| aligned 'null' | tokens kept | object tokens kept "
        "(naive / 'prev' / 'null') |",
        '|---|---|---|---|---|---|---|---|',
    ]
    for name, res in results.items():
        for e in res['pruned']:
            share = 100 * e['tokens_kept'] / e['tokens']
            objects = ' / '.join(
                f'{e[f"{v}_object_kept"]:.0f}%'
                for v in ('naive', 'prev', 'null')
            )
            lines.append(
                f'| {name} | {e["metric"]} | {res["dense"]:.1f} '
                f'| {e["naive"]:.1f} | {e["prev"]:.1f} | {e["null"]:.1f} '
                f'| {e["tokens_kept"]}/{e["tokens"]} ({share:.0f}%) '
                f'| {objects} |'
            )
    return '\n'.join(lines)


def finetune_table(results: Dict[str, dict]) -> str:
    """The markdown table of zero-shot and fine-tuned top-1, side by side
    (empty if nothing was fine-tuned)."""
    lines = [
        '| model | metric | tokens kept | dense | dense ft | naive '
        "| naive ft | aligned 'prev' | 'prev' ft | aligned 'null' "
        "| 'null' ft |",
        '|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for name, res in results.items():
        for e in res['pruned']:
            if 'naive_ft' not in e:
                continue
            cells = ' | '.join(
                f'{e[v]:.1f} | {e[f"{v}_ft"]:.1f}'
                for v in ('naive', 'prev', 'null')
            )
            lines.append(
                f'| {name} | {e["metric"]} '
                f'| {e["tokens_kept"]}/{e["tokens"]} | {res["dense"]:.1f} '
                f'| {res["dense_ft"]:.1f} | {cells} |'
            )
    return '\n'.join(lines) if len(lines) > 2 else ''


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add(
        '--models',
        nargs='+',
        choices=MODELS,
        default=list(MODELS),
        help='models to train (both)',
    )
    add('--epochs', type=int, default=8, help='training epochs (8)')
    add('--seed', type=int, default=0, help='seed (0)')
    add(
        '--keep',
        type=float,
        nargs='+',
        default=[0.6],
        help='fraction of the tokens kept after the last of the two '
        'pruning steps; several values share one trained model (0.6)',
    )
    add(
        '--metrics',
        nargs='+',
        choices=SSM_SCORES + REFERENCES,
        default=['clip'],
        help="importance scores: the scorers 'clip' (the paper's), 'l1', "
        "'l2', 'raw', or the reference selections 'oracle' (the patches "
        "the object covers most) and 'random' ('clip')",
    )
    add('--num-train', type=int, default=3000, help='training images (3000)')
    add('--num-test', type=int, default=1200, help='test images (1200)')
    add(
        '--image-size',
        type=int,
        default=128,
        help='image side; the models see (side / 16)^2 tokens (128)',
    )
    add('--embed-dims', type=int, default=64, help='token channels (64)')
    add('--depth', type=int, default=6, help='layers (6)')
    add('--batch-size', type=int, default=64, help='batch size (64)')
    add('--lr', type=float, default=3e-3, help='peak learning rate (3e-3)')
    add(
        '--finetune-epochs',
        type=int,
        default=0,
        help='fine-tune each pruned variant (and the dense model) from the '
        'dense weights for this many epochs and report its top-1 beside the '
        'zero-shot one (0: zero-shot only)',
    )
    add(
        '--finetune-lr',
        type=float,
        default=3e-4,
        help='peak learning rate of the fine-tuning (3e-4)',
    )
    add('--threads', type=int, default=2, help='torch threads (2)')
    add(
        '--log-every',
        type=int,
        default=0,
        help='print the loss every this many steps (0: never)',
    )
    add(
        '--work-dir',
        help='save each trained dense model here (<model>_dense.pth) and '
        'reuse it when the training settings are the same',
    )
    add('--out', help='write the results to this JSON file')
    args = parser.parse_args(argv)  # fmt: skip
    for name in ('epochs', 'num_train', 'num_test', 'batch_size', 'threads'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1')
    if args.finetune_epochs < 0 or args.finetune_lr <= 0:
        parser.error('--finetune-epochs must be >= 0, --finetune-lr > 0')
    if args.depth < 3:
        parser.error('--depth must be >= 3 (two pruning steps)')
    if args.image_size < 32:
        parser.error('--image-size must be >= 32')
    if not all(0 < keep <= 1 for keep in args.keep):
        parser.error(f'--keep must be in (0, 1], got {args.keep}')
    if args.seed < 0:
        parser.error('--seed must be >= 0')
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    # the optimizer constructor lists every parameter without decay at INFO
    MMLogger.get_instance('pruning_fidelity', log_level='WARNING')
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    start = time.perf_counter()
    data = {
        'train': make_synthetic_cls(
            args.num_train, args.image_size, args.seed, 'train'
        ),
        'test': make_synthetic_cls(
            args.num_test, args.image_size, args.seed, 'test', True
        ),
    }
    data_time = time.perf_counter() - start
    print(f'synthetic set: {args.num_train} + {args.num_test} images of '
          f'{args.image_size}x{args.image_size}, {len(CLS_CLASSES)} '
          f'classes, made in {data_time:.0f} s', flush=True)  # fmt: skip
    results = {m: run_model(m, args, data) for m in args.models}
    total_time = time.perf_counter() - start
    print(f'\n{table(results)}\n')
    finetuned = finetune_table(results)
    if finetuned:
        print(f'zero-shot and after {args.finetune_epochs} epoch(s) of '
              f'fine-tuning (top-1 %):\n\n{finetuned}\n')  # fmt: skip
    for name, res in results.items():
        cpu = res['train_cpu_s']
        cpu = '' if cpu is None else f' ({cpu:.0f} s CPU)'
        ft = res.get('finetune_cpu_s')
        ft = '' if ft is None else f' (fine-tuning {ft:.0f} s CPU)'
        print(f'{name}: trained in {res["train_time_s"]:.0f} s{cpu}, '
              f'evaluated in {res["eval_time_s"]:.0f} s{ft}')  # fmt: skip
    print(f'total {total_time:.0f} s ({args.threads} threads; chance '
          f'{100 / len(CLS_CLASSES):.1f}%)')  # fmt: skip
    report = dict(
        settings=vars(args),
        classes=list(CLS_CLASSES),
        data_time_s=round(data_time, 1),
        total_time_s=round(total_time, 1),
        torch=torch.__version__,
        python=platform.python_version(),
        results=results,
    )
    if args.out:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        atomic_write(args.out, json.dumps(report, indent=2))
        print(f'wrote {args.out}')
    return report


if __name__ == '__main__':
    main(sys.argv[1:])
