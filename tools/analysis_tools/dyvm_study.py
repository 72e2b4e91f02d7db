"""DyVM's small-scale study on the synthetic classification set.

From one dense model (the mini DyVM config's Vim, trained here from
scratch), at matched FLOPs (steps after layers 2, 4, 6 keeping about 0.7,
0.49, 0.343 of the 64 patch tokens) and the same fine-tuning budget:

* ToP static pruning (the 'clip' score, aligned), zero-shot and fine-tuned;
* the same schedule naive (``align=False``), fine-tuned;
* DyVM, rearranged (as released), fine-tuned with its losses and teacher;
* DyVM aligned (``align=True``), the same.

Direction selection is off (a token-pruning comparison at equal FLOPs).
Prints one markdown table (top-1, FLOPs, kept tokens) and writes the
kept-token maps of a few validation images (``kept_tokens.png``) and the
results (``results.json``) into the work dir. CPU-sized: minutes.

Example::

    python tools/analysis_tools/dyvm_study.py --work-dir work_dirs/study
"""

import argparse
import copy
import json
import os
import os.path as osp
import time

import numpy as np

from mmssm.errors import UserError
from mmssm.utils.cli import exit_on_user_error
from mmssm.utils.fileio import atomic_imwrite, atomic_write

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
MINI = osp.join(
    ROOT, 'configs', 'dyvm', 'dyvm_vim-mini_1xb8-2e_synthetic-cls-128.py'
)
LAYERS = (2, 4, 6)
TOP = dict(type='mmssm.TokenPruner', layers=LAYERS, keep_ratios=0.7)
DYVM = dict(type='mmssm.LearnedTokenPruner', layers=LAYERS, keep_ratios=0.7)
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
    add('--image-size', type=int, default=128, help='of the set (128)')
    add('--num-train', type=int, default=600, help='training images (600)')
    add('--num-val', type=int, default=120, help='validation images (120)')
    add('--dense-epochs', type=int, default=10)
    add('--ft-epochs', type=int, default=3)
    add('--dense-lr', type=float, default=1e-3)
    add('--ft-lr', type=float, default=2e-4)
    add('--images', type=int, default=4, help='images in the token maps')
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
    if args.image_size % 16 or args.image_size < 64:
        parser.error('--image-size must be a multiple of 16, >= 64')
    if args.data is None:
        args.data = f'data/synthetic/cls-{args.image_size}-{args.num_train}/'
    return args


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
        cfg[f'{split}_dataloader'].dataset.data_root = args.data
    model = cfg.model
    model.backbone.img_size = args.image_size
    model.backbone.direction_gate = False
    model.backbone.prune_cfg = copy.deepcopy(prune_cfg)
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
    """Train (unless zero-shot) and test one method; returns the runner
    (its model trained) and the top-1."""
    from mmssm.utils.cli import build_runner

    cfg = make_cfg(args, name, load_from)
    runner = build_runner(cfg, MINI)
    if METHODS[name][3]:
        runner.train()
    metrics = runner.test()
    return runner, float(metrics['accuracy/top1'])


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
    pruned ones darkened)."""

    rows = []
    for i, image in enumerate(images):
        img = image.permute(1, 2, 0).numpy().astype(np.float32)
        tiles = [img]
        for name in labels:
            mask = maps[name][i].astype(np.float32)
            scale = img.shape[0] // mask.shape[0]
            big = np.kron(mask, np.ones((scale, scale), np.float32))
            big = big[: img.shape[0], : img.shape[1], None]
            tiles.append(img * (0.25 + 0.75 * big))
        gap = np.full((img.shape[0], 4, 3), 255, np.float32)
        row = [t for tile in tiles for t in (tile, gap)][:-1]
        rows.append(np.concatenate(row, axis=1))
    atomic_imwrite(path, np.concatenate(rows, axis=0).astype(np.uint8))


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
    results, runners = {}, {}
    runners['dense'], top1 = run(args, 'dense')
    results['dense'] = dict(top1=top1)
    dense_ckpt = last_checkpoint(osp.join(args.work_dir, 'dense'))
    for name in METHODS:
        if name == 'dense':
            continue
        runners[name], top1 = run(args, name, dense_ckpt)
        results[name] = dict(top1=top1)
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
    size, M = args.image_size, (args.image_size // 16) ** 2
    lines = [
        f'| method | top-1 (%) | FLOPs (G, {size}x{size}) | kept patch '
        f'tokens after layers 2/4/6 (of {M}) |',
        '|---|---:|---:|---|',
    ]
    for name, (label, *_) in METHODS.items():
        r = results[name]
        kept = '/'.join(map(str, r.get('kept', []))) or str(M)
        lines.append(
            f'| {label} | {r["top1"]:.1f} | {r["flops_g"]:.4f} | {kept} |'
        )
    table = '\n'.join(lines)
    print(table)
    print(
        f'dense {args.dense_epochs} epochs (lr {args.dense_lr}), '
        f'fine-tuning {args.ft_epochs} epochs (lr {args.ft_lr}); '
        f'{total:.0f} s; maps: {args.work_dir}/kept_tokens.png '
        f'(columns: image, {", ".join(pruned)})'
    )
    atomic_write(
        osp.join(args.work_dir, 'results.json'),
        json.dumps(dict(results=results, args=vars(args)), indent=1),
    )


if __name__ == '__main__':
    main()
