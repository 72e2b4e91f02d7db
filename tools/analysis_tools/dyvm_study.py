"""DyVM's small-scale study on the synthetic classification set.

From one dense model (the mini DyVM config's Vim, 8 layers of 64
channels, trained here from scratch), at matched FLOPs and the same
fine-tuning budget:

* ToP static pruning (the 'clip' score, aligned), zero-shot and fine-tuned;
* the same schedule naive (``align=False``), fine-tuned;
* DyVM, rearranged (as released), fine-tuned with its losses and teacher;
* DyVM aligned (``align=True``), the same.

Every pruned model keeps the same patch tokens after layers 2, 4, 6:
DyVM's ``int(0.7^s M)`` of the ``M`` patch tokens (ToP's per-step ratios
are set to give the same counts, :func:`matched_top_ratios`). Direction
selection is off (a token-pruning comparison at equal FLOPs).

Prints one markdown table (top-1 with its standard error, the difference
from dense with the paired standard error over the same images, FLOPs,
kept tokens, seconds per run) and writes the kept-token maps of a few
validation images (``kept_tokens.png``) and the results
(``results.json``) into the work dir.

The defaults are the scale at which the dense model converges (64 x 64
images, 16 patch tokens, 3000 training and 600 validation images, 8
epochs): about half an hour at one thread. Example::

    OMP_NUM_THREADS=1 python tools/analysis_tools/dyvm_study.py \\
        --work-dir work_dirs/dyvm_study
"""

import argparse
import copy
import json
import os
import os.path as osp
import time
from typing import List, Tuple

import numpy as np

from mmssm.errors import UserError
from mmssm.utils.cli import exit_on_user_error
from mmssm.utils.fileio import atomic_imwrite, atomic_write

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
MINI = osp.join(
    ROOT, 'configs', 'dyvm', 'dyvm_vim-mini_1xb8-2e_synthetic-cls-128.py'
)
LAYERS = (2, 4, 6)
KEEP = 0.7  # DyVM's r: it keeps int(r^s M) patch tokens after step s
# ToP's per-step ratios are set by matched_top_ratios (the same counts)
TOP = dict(type='mmssm.TokenPruner', layers=LAYERS)
DYVM = dict(type='mmssm.LearnedTokenPruner', layers=LAYERS, keep_ratios=KEEP)
NO_DYVM_LOSSES = dict(
    token_ratio_loss=None,
    direction_ratio_loss=None,
    distill_kl_loss=None,
    distill_tokens_loss=None,
    teacher=None,
)
#: name -> (label, prune_cfg, DyVM losses and teacher, fine-tuned)
METHODS = {
    'dense': ('dense', None, False, True),
    'top-zero-shot': ('ToP aligned, zero-shot', TOP, False, False),
    'top-ft': ('ToP aligned, fine-tuned', TOP, False, True),
    'naive-ft': ('naive, fine-tuned', dict(TOP, align=False), False, True),
    'dyvm': ('DyVM rearranged', DYVM, True, True),
    'dyvm-align': ('DyVM aligned', dict(DYVM, align=True), True, True),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add('--work-dir', default='work_dirs/dyvm_study')
    add(
        '--data',
        default=None,
        help='the synthetic set, written if missing (default: '
        'data/synthetic/cls-SIZE-NTRAIN/)',
    )
    add('--image-size', type=int, default=64, help='of the set (64)')
    add(
        '--patch-size',
        type=int,
        default=16,
        help="the Vim's patch size and stride (16)",
    )
    add('--num-train', type=int, default=3000, help='training images')
    add('--num-val', type=int, default=600, help='validation images')
    add('--dense-epochs', type=int, default=8)
    add('--ft-epochs', type=int, default=2)
    add('--dense-lr', type=float, default=1e-3)
    add('--batch-size', type=int, default=32, help='per step, all runs')
    add('--ft-lr', type=float, default=5e-4)
    add('--images', type=int, default=6, help='images in the token maps')
    add('--seed', type=int, default=0)
    add(
        '--mixup',
        action='store_true',
        help="keep the config's Mixup/CutMix (off by default: they hold "
        'back a small model trained from scratch on a small set)',
    )
    args = parser.parse_args(argv)
    if min(args.dense_epochs, args.ft_epochs, args.images) < 1:
        parser.error('--dense-epochs, --ft-epochs and --images must be >= 1')
    if args.batch_size < 1:
        parser.error('--batch-size must be >= 1')
    if args.patch_size < 1 or args.image_size % args.patch_size:
        parser.error('--image-size must be a multiple of --patch-size')
    if (args.image_size // args.patch_size) ** 2 < 16:
        parser.error('--image-size / --patch-size must be >= 4 (16 tokens)')
    if args.data is None:
        args.data = f'data/synthetic/cls-{args.image_size}-{args.num_train}/'
    return args


def dyvm_counts(num_patches: int) -> List[int]:
    """The patch tokens DyVM keeps after each step at inference."""
    from mmssm.models.pruning import LearnedTokenPruner, TokenPruner

    ratios = LearnedTokenPruner(
        keep_ratios=KEEP, layers=LAYERS, num_layers=8, embed_dims=8
    ).keep_ratios
    probe = TokenPruner(layers=LAYERS, num_layers=8, keep_ratios=ratios)
    return [probe.num_keep(s, num_patches) for s in range(len(LAYERS))]


def matched_top_ratios(num_patches: int) -> Tuple[float, ...]:
    """ToP's per-step keep ratios that keep DyVM's token counts (matched
    FLOPs: ToP keeps ``floor(ratio * K)`` of the ``K`` tokens entering a
    step, DyVM ``int(r^s M)`` of all ``M``)."""
    counts = [num_patches, *dyvm_counts(num_patches)]
    return tuple(k / prev for prev, k in zip(counts, counts[1:]))


def make_cfg(args, name: str, load_from=None):
    """The mini config for one method."""
    from mmengine.config import Config

    label, prune_cfg, dyvm, _ = METHODS[name]
    cfg = Config.fromfile(MINI)
    cfg.work_dir = osp.join(args.work_dir, name)
    # one process runs several Runners: their loggers need their own names
    cfg.experiment_name = f'dyvm_study_{name}_{time.strftime("%H%M%S")}'
    cfg.randomness = dict(seed=args.seed)
    cfg.default_hooks.logger.interval = 25
    for split in ('train', 'val', 'test'):
        loader = cfg[f'{split}_dataloader']
        loader.dataset.data_root = args.data
        loader.batch_size = args.batch_size
    model = cfg.model
    model.backbone.img_size = args.image_size
    model.backbone.arch.patch_size = args.patch_size
    model.backbone.arch.stride = args.patch_size
    model.backbone.direction_gate = False
    model.backbone.prune_cfg = copy.deepcopy(prune_cfg)
    if prune_cfg is not None and prune_cfg['type'] == TOP['type']:
        num_patches = (args.image_size // args.patch_size) ** 2
        model.backbone.prune_cfg.keep_ratios = matched_top_ratios(num_patches)
    model.update(NO_DYVM_LOSSES)
    if not args.mixup:
        model.train_cfg = None
    if dyvm:
        model.token_ratio_loss = dict(type='mmssm.TokenRatioLoss')
        model.distill_kl_loss = dict(type='mmssm.LogitDistillLoss')
        model.distill_tokens_loss = dict(type='mmssm.TokenDistillLoss')
        model.teacher = dict(checkpoint=load_from)
    dense = name == 'dense'
    epochs = args.dense_epochs if dense else args.ft_epochs
    cfg.load_from = load_from
    cfg.optim_wrapper.optimizer.lr = args.dense_lr if dense else args.ft_lr
    cfg.param_scheduler = [
        dict(
            type='LinearLR',
            start_factor=0.01,
            by_epoch=True,
            begin=0,
            end=1,
            convert_to_iter_based=True,
        ),
        dict(
            type='CosineAnnealingLR',
            eta_min=1e-6,
            by_epoch=True,
            begin=1,
            end=max(epochs, 2),
            convert_to_iter_based=True,
        ),
    ]
    cfg.train_cfg = dict(by_epoch=True, max_epochs=epochs, val_interval=epochs)
    return cfg


def run(args, name: str, load_from=None):
    """Train (unless zero-shot) and test one method.

    Returns:
        tuple: The runner (its model trained), the top-1 (%) of the
        Runner's test loop, and whether each validation image is
        classified correctly (N, ) bool (a second pass, which must give
        the same top-1).
    """
    from mmssm.utils.cli import build_runner

    cfg = make_cfg(args, name, load_from)
    runner = build_runner(cfg, MINI)
    if METHODS[name][3]:
        runner.train()
    top1 = float(runner.test()['accuracy/top1'])
    correct = correct_per_image(runner)
    if abs(100 * correct.mean() - top1) > 1e-3:
        raise RuntimeError(
            f'{name}: the per-image pass gives top-1 '
            f'{100 * correct.mean():.3f}, the test loop {top1:.3f}'
        )
    return runner, top1, correct


def correct_per_image(runner) -> np.ndarray:
    """(N, ) bool: whether the model's top-1 class of each image of the
    Runner's test set is its label (in the dataset's order)."""
    import torch

    model = runner.model.eval()
    correct = []
    with torch.no_grad():
        for data in runner.test_loop.dataloader:
            for sample in model.test_step(data):
                correct.append(
                    int(sample.pred_label[0]) == int(sample.gt_label[0])
                )
    return np.array(correct, bool)


def standard_errors(correct: np.ndarray, reference: np.ndarray):
    """Standard errors (points) of a top-1 and of its difference from the
    reference model's on the same images (paired: the per-image
    differences' standard deviation / sqrt(N))."""
    n = len(correct)
    p = correct.mean()
    se = 100 * np.sqrt(p * (1 - p) / n)
    diff = correct.astype(float) - reference.astype(float)
    se_diff = 100 * diff.std(ddof=1) / np.sqrt(n) if n > 1 else float('nan')
    return float(se), float(se_diff)


def last_checkpoint(work_dir: str) -> str:
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


def kept_maps(runner, images):
    """(N, h, w) bool, the patch tokens kept after the last step, and the
    kept patch tokens after each step."""
    import torch

    model = runner.model.eval()
    pruner = model.backbone.pruner
    kept = {}

    def hook(pruner, step, before, after, scores):
        mask = after.patch_kept_mask()
        kept['mask'] = mask
        kept.setdefault('counts', []).append(int(mask[0].sum()))

    handle = pruner.register_step_hook(hook)
    try:
        with torch.no_grad():
            data = model.data_preprocessor(dict(inputs=images), False)
            model(data['inputs'], mode='tensor')
    finally:
        handle.remove()
    return kept['mask'].cpu().numpy(), kept['counts']


def draw(images, maps, labels, path: str) -> None:
    """One row per image: the image, then each method's kept tokens (the
    pruned ones washed out towards white, as the glyphs are dark); enlarged
    to rows of at least 128 pixels."""

    rows = []
    for i, image in enumerate(images):
        img = image.permute(1, 2, 0).numpy().astype(np.float32)
        tiles = [img]
        for name in labels:
            mask = maps[name][i].astype(np.float32)
            scale = img.shape[0] // mask.shape[0]
            big = np.kron(mask, np.ones((scale, scale), np.float32))
            big = big[: img.shape[0], : img.shape[1], None]
            tiles.append(img * (0.3 + 0.7 * big) + 178.5 * (1 - big))
        gap = np.full((img.shape[0], 4, 3), 255, np.float32)
        row = [t for tile in tiles for t in (tile, gap)][:-1]
        rows.append(np.concatenate(row, axis=1))
    picture = np.concatenate(rows, axis=0).astype(np.uint8)
    # small images are enlarged (pixels repeated) to be seen
    scale = max(1, 128 // images[0].shape[1])
    picture = picture.repeat(scale, axis=0).repeat(scale, axis=1)
    atomic_imwrite(path, picture)


def format_table(results: dict, args) -> str:
    """The markdown table of the study's results."""
    size, M = args.image_size, (args.image_size // args.patch_size) ** 2
    layers = '/'.join(map(str, LAYERS))
    lines = [
        f'| method | top-1 (%) | vs dense (points) | MFLOPs ({size}x{size}) '
        f'| kept patch tokens after layers {layers} (of {M}) | run (s) |',
        '|---|---:|---:|---:|---|---:|',
    ]
    for name, (label, *_) in METHODS.items():
        r = results[name]
        kept = '/'.join(map(str, r.get('kept', []))) or str(M)
        diff = (
            '' if name == 'dense' else f'{r["diff"]:+.1f} ± {r["se_diff"]:.1f}'
        )
        lines.append(
            f'| {label} | {r["top1"]:.1f} ± {r["se"]:.1f} | {diff} | '
            f'{1e3 * r["flops_g"]:.2f} | {kept} | {r["seconds"]:.0f} |'
        )
    return '\n'.join(lines)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    import mmcv
    import torch

    from mmssm.datasets import write_synthetic_cls
    from mmssm.utils.flops import count_flops

    if not osp.isdir(args.data):
        write_synthetic_cls(
            args.data,
            args.num_train,
            args.num_val,
            image_size=args.image_size,
            seed=args.seed,
        )
    os.makedirs(args.work_dir, exist_ok=True)
    start = time.perf_counter()
    results, runners, correct = {}, {}, {}
    dense_ckpt = None
    for name in METHODS:  # dense first: the others start from it
        start_method = time.perf_counter()
        runners[name], top1, correct[name] = run(args, name, dense_ckpt)
        results[name] = dict(
            top1=top1, seconds=time.perf_counter() - start_method
        )
        if name == 'dense':
            dense_ckpt = last_checkpoint(osp.join(args.work_dir, 'dense'))
    for name in METHODS:
        se, se_diff = standard_errors(correct[name], correct['dense'])
        results[name].update(
            se=se,
            diff=results[name]['top1'] - results['dense']['top1'],
            se_diff=se_diff,
        )
    x = torch.randn(1, 3, args.image_size, args.image_size)
    for name, runner in runners.items():
        report = count_flops(runner.model, x)
        results[name].update(flops_g=report.total / 1e9)
    # kept-token maps of the first validation images
    with open(osp.join(args.data, 'meta', 'val.txt')) as f:
        files = [line.split()[0] for line in f.read().splitlines()]
    if len(files) < args.images:
        raise UserError(f'{args.data} has fewer than {args.images} images')
    images = [
        torch.from_numpy(
            np.ascontiguousarray(
                mmcv.imread(osp.join(args.data, p)).transpose(2, 0, 1)
            )
        )
        for p in files[: args.images]
    ]
    pruned = [n for n in METHODS if METHODS[n][1] is not None]
    maps = {}
    for name in pruned:
        maps[name], results[name]['kept'] = kept_maps(runners[name], images)
    draw(images, maps, pruned, osp.join(args.work_dir, 'kept_tokens.png'))

    total = time.perf_counter() - start
    table = format_table(results, args)
    print(table)
    print(
        f'dense {args.dense_epochs} epochs (lr {args.dense_lr}), '
        f'fine-tuning {args.ft_epochs} epochs (lr {args.ft_lr}), batch '
        f'{args.batch_size}; {total:.0f} s; maps: '
        f'{args.work_dir}/kept_tokens.png (columns: image, '
        f'{", ".join(pruned)})'
    )
    atomic_write(
        osp.join(args.work_dir, 'results.json'),
        json.dumps(dict(results=results, args=vars(args)), indent=1),
    )


if __name__ == '__main__':
    main()
