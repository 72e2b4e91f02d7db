"""Zero-shot token pruning of small SSM classifiers, trained on the CPU.

The central claim of "Exploring Token Pruning in Vision State Space Models"
(NeurIPS 2024), at a small scale: a vision SSM trained dense loses much of
its accuracy when its tokens are pruned naively (the kept tokens scanned as
a shorter sequence), and keeps most of it when the scan keeps their
original positions (the pruning-aware hidden-state alignment).

For each model (a small PlainMamba and a small Vim) the tool

1. makes the synthetic classification set of
   :mod:`mmssm.datasets.synthetic_cls` (one of six glyphs on textured
   clutter; a train and a test split of a fixed seed, in memory);
2. trains the dense classifier (``mmssm.SSMClassifier``) from scratch with
   AdamW and a cosine schedule;
3. evaluates the same weights, without fine-tuning, dense and with pruning
   after about 1/3 and 2/3 of the depth: naive (``align=False``), aligned
   with ``gap_mode='prev'`` and aligned with ``gap_mode='null'``. Each
   pruned model is a new classifier built with its ``prune_cfg`` that loads
   the dense state dict strictly (pruning adds no parameter).

``--keep`` is the fraction of the tokens kept after the last step; each of
the two steps keeps ``keep ** (1 / 2)`` of the tokens entering it (0.6:
0.775 per step, 64 -> 49 -> 37 tokens of an 8 x 8 grid), and the table
shows the tokens that are actually kept (floor at each step; Vim's class
token is never pruned and not counted). Several values and several
importance metrics (``--metrics``) are evaluated on the one trained model.
Besides the SSM scores ('clip', the paper's, 'l1', 'l2', 'raw'), two
reference selections separate *which* tokens are kept from *how* the scan
runs on them: 'oracle' ranks the patches by how much of them the object
covers, 'random' at random. The last column is the share of the object's
patches (covered for at least a quarter) still kept after the last step.

It prints one markdown table (model | metric | dense | naive | 'prev' |
'null' | tokens kept | object tokens kept) and the training times, and
writes everything to ``--out`` as JSON. ``--work-dir`` keeps the trained
dense models, so that other ``--keep`` and ``--metrics`` are evaluated
without training again. Seeds are fixed and the run is deterministic as
far as torch allows (``torch.use_deterministic_algorithms(warn_only=True)``;
the thread count changes the rounding, so it is part of the settings).

Example (about 10 minutes on a quiet 2-core machine)::

    python tools/analysis_tools/pruning_fidelity.py --out fidelity.json
    python tools/analysis_tools/pruning_fidelity.py --models vim \\
        --keep 0.6 0.4 --metrics clip l1 --epochs 10
"""

import argparse
import json
import math
import os
import os.path as osp
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mmssm.datasets.synthetic_cls import (
    CLS_CLASSES,
    GENERATOR_VERSION,
    make_synthetic_cls,
)
from mmssm.models.classifiers import SSMClassifier
from mmssm.models.layers import METRICS, TokenPruner, TokenState

MODELS = ('plainmamba', 'vim')

#: The zero-shot variants: the name in the table and the prune_cfg keys
#: added to the schedule (None: dense).
VARIANTS = {
    'dense': None,
    'naive': dict(align=False),
    'prev': dict(align=True, gap_mode='prev'),
    'null': dict(align=True, gap_mode='null'),
}

#: Reference selections, ranked by other scores than the SSM output's:
#: 'oracle' keeps the patches that the object covers most, 'random' keeps
#: a random subset (same schedule, same variants).
REFERENCES = ('oracle', 'random')

#: A patch is an object token if the object covers this much of it.
OBJECT_COVERAGE = 0.25

# Patch size of both models (PlainMamba's stem has stride 16).
PATCH = 16

# Per-channel normalisation of the uint8 images.
MEAN, STD = 127.5, 64.0


def backbone_cfg(
    model: str, embed_dims: int, depth: int, image_size: int
) -> dict:
    """The dense backbone config of a small model.

    Both models see a grid of ``image_size / 16`` x ``image_size / 16``
    patch tokens (8 x 8 at 128): PlainMamba through its stride-16 stem
    (without its 3x3 convs, with a 3x3 depthwise conv in the mixer, as the
    grid is small), Vim through a 16 x 16 patch convolution, with its
    middle class token.

    Args:
        model (str): 'plainmamba' or 'vim'.
        embed_dims (int): Token channels.
        depth (int): Layers.
        image_size (int): Input side.

    Returns:
        dict: The config (``type`` and arguments) of the backbone.
    """
    if model == 'plainmamba':
        arch = dict(
            embed_dims=embed_dims,
            num_layers=depth,
            num_convs=0,
            dw_layers=[],
            d_state=8,
            expand=2,
            conv_size=3,
        )
        return dict(type='mmssm.PlainMamba', arch=arch, img_size=image_size)
    if model == 'vim':
        arch = dict(
            embed_dims=embed_dims,
            num_layers=depth,
            patch_size=16,
            stride=16,
            d_state=8,
            expand=2,
            d_conv=4,
            cls_token='middle',
        )
        return dict(type='mmssm.Vim', arch=arch, img_size=image_size)
    raise ValueError(f'model must be one of {MODELS}, got {model!r}')


def schedule(depth: int, keep: float) -> dict:
    """Two pruning steps, after about 1/3 and 2/3 of the layers.

    Args:
        depth (int): Layers (>= 3).
        keep (float): Fraction of the tokens kept after the last step.

    Returns:
        dict: ``layers`` (1-based) and ``keep_ratios`` of a ``prune_cfg``.
    """
    layers = (max(1, round(depth / 3)), max(2, round(2 * depth / 3)))
    if not layers[0] < layers[1] <= depth - 1:
        raise ValueError(f'depth must be >= 3 to prune twice, got {depth}')
    ratio = round(keep ** (1 / len(layers)), 6)
    return dict(layers=layers, keep_ratios=(ratio,) * len(layers))


def tokens_kept(model: SSMClassifier, images: Tensor) -> Tuple[int, int]:
    """Patch tokens kept after the last pruning step, and all of them.

    Args:
        model (SSMClassifier): A classifier whose backbone prunes.
        images (Tensor): A batch to take the grid size from.

    Returns:
        tuple[int, int]: (kept, total); Vim's class token is not counted.
    """
    backbone = model.backbone
    with torch.no_grad():
        state = backbone.init_tokens(normalise(images[:1]))
    total = state.tokens.shape[1]
    has_cls = state.cls_index is not None
    kept = total - int(has_cls)
    pruner = backbone.pruner
    for step in range(len(pruner.layers)):
        kept = pruner.num_keep(step, kept)
    return kept, total - int(has_cls)


def normalise(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float32, about zero mean and unit std."""
    return (images.float() - MEAN) / STD


def train(
    model: SSMClassifier,
    images: Tensor,
    labels: Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    log_every: int = 0,
) -> List[float]:
    """Train a classifier with AdamW, linear warm-up and cosine decay.

    Augmentation: a random horizontal flip (every class is symmetric
    under it up to rotation, which the set already varies).

    Args:
        model (SSMClassifier): The classifier, trained in place.
        images (Tensor): uint8 (N, 3, H, W).
        labels (Tensor): int64 (N, ).
        epochs (int): Passes over the set.
        batch_size (int): Images per step (the last partial batch of an
            epoch is dropped unless it is the only one).
        lr (float): Peak learning rate.
        seed (int): Seed of the shuffling and the flips.
        log_every (int): Print the loss every this many steps (0: never).
            Defaults to 0.

    Returns:
        list[float]: The mean training loss of each epoch.
    """
    gen = torch.Generator().manual_seed(seed)
    num = images.shape[0]
    steps_per_epoch = max(1, num // batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, min(total // 10, 2 * steps_per_epoch))
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if (
            param.ndim <= 1
            or getattr(param, '_no_weight_decay', False)
            or name.endswith('pos_embed')
            or name.endswith('cls_token')
        ):
            no_decay.append(param)
        else:
            decay.append(param)
    optimizer = torch.optim.AdamW(
        [
            dict(params=decay, weight_decay=0.05),
            dict(params=no_decay, weight_decay=0.0),
        ],
        lr=lr,
        betas=(0.9, 0.999),
    )

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    losses = []
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(num, generator=gen)
        running, count = 0.0, 0
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            x = normalise(images[idx])
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            for group in optimizer.param_groups:
                group['lr'] = lr_at(step)
            loss = F.cross_entropy(model(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            running += float(loss.detach()) * len(idx)
            count += len(idx)
            step += 1
            if log_every and step % log_every == 0:
                print(
                    f'  epoch {epoch + 1} step {step}/{total} '
                    f'loss {float(loss.detach()):.3f}',
                    flush=True,
                )
        losses.append(running / max(count, 1))
    return losses


class ReferencePruner(TokenPruner):
    """A pruner that ranks the tokens by given scores, for reference.

    The schedule, ``align``, ``gap_mode`` and the class token are those of
    ``base``; only the ranking differs: :attr:`scores` (B, L), one score per
    token of the full sequence (Vim's class token included: it is never
    pruned), set before each forward.

    Args:
        base (TokenPruner): The pruner to copy.
    """

    def __init__(self, base: TokenPruner) -> None:
        super().__init__(
            layers=base.layers,
            keep_ratios=base.keep_ratios,
            num_layers=base.num_layers,
            metric='clip',
            align=base.align,
            gap_mode=base.gap_mode,
        )
        self.scores: Optional[Tensor] = None

    def prune(
        self, state: TokenState, ssm_out: Tensor, step: int
    ) -> TokenState:
        scores = self.scores
        if state.index is not None:
            scores = scores.gather(1, state.index)
        # the 'clip' score of a non-negative (B, K, 1) tensor is the tensor
        fake = scores.clamp(min=0)[..., None].to(ssm_out.dtype)
        return super().prune(state, fake, step)


def patch_coverage(masks: Tensor, grid: Tuple[int, int]) -> Tensor:
    """The fraction of each 16 x 16 patch that the object covers.

    Args:
        masks (Tensor): (N, H, W) uint8 object coverage (0 .. 255).
        grid (tuple[int, int]): The models' patch grid (h, w); the masks
            are zero-padded at the bottom and right to it, as the models
            pad the images.

    Returns:
        Tensor: (N, h * w) in [0, 1], patches in raster order.
    """
    m = masks.float()[:, None] / 255
    pad_h = grid[0] * PATCH - m.shape[-2]
    pad_w = grid[1] * PATCH - m.shape[-1]
    m = F.pad(m, (0, max(pad_w, 0), 0, max(pad_h, 0)))
    m = m[..., : grid[0] * PATCH, : grid[1] * PATCH]
    return F.avg_pool2d(m, PATCH).flatten(1)


def reference_scores(
    kind: str,
    coverage: Tensor,
    cls_index: Optional[int],
    generator: torch.Generator,
) -> Tensor:
    """Scores of the reference selections for a batch.

    Args:
        kind (str): 'oracle': the object's coverage of each patch (ties,
            e.g. among background patches, broken at random); 'random':
            uniform.
        coverage (Tensor): (B, M) from :func:`patch_coverage`.
        cls_index (int, optional): Where a class token sits in the full
            sequence (it gets a score of 0; it is never pruned).
        generator (torch.Generator): For the random part.

    Returns:
        Tensor: (B, L) scores of the full sequence.
    """
    noise = torch.rand(coverage.shape, generator=generator)
    scores = coverage + 1e-3 * noise if kind == 'oracle' else noise
    if cls_index is not None:
        zero = scores.new_zeros(scores.shape[0], 1)
        scores = torch.cat(
            [scores[:, :cls_index], zero, scores[:, cls_index:]], 1
        )
    return scores


@torch.no_grad()
def evaluate(
    model: SSMClassifier,
    images: Tensor,
    labels: Tensor,
    coverage: Tensor,
    batch_size: int,
    reference: Optional[str] = None,
    seed: int = 0,
) -> Tuple[float, float]:
    """Top-1 accuracy and the object tokens kept, in eval mode.

    The backbone's layers run as in its ``forward`` (its last output is
    classified), keeping the final token state to see which patches were
    kept.

    Args:
        model (SSMClassifier): A classifier (its backbone may prune).
        images (Tensor): uint8 (N, 3, H, W).
        labels (Tensor): (N, ).
        coverage (Tensor): (N, M) object coverage of each patch, see
            :func:`patch_coverage`.
        batch_size (int): Images per forward.
        reference (str, optional): Rank the tokens by a reference
            selection of :data:`REFERENCES` instead of the backbone's
            pruner metric (the backbone must prune). Defaults to None.
        seed (int): Seed of the reference's random part. Defaults to 0.

    Returns:
        tuple[float, float]: Top-1 (%) and the object tokens kept: the
        patches covered by the object for at least
        :data:`OBJECT_COVERAGE` that are still computed after the last
        pruning step (% of them, averaged over the images).
    """
    model.eval()
    backbone = model.backbone
    pruner = backbone.pruner
    if reference is not None:
        backbone.pruner = ReferencePruner(pruner)
    generator = torch.Generator().manual_seed(seed)
    last = backbone.num_layers - 1
    correct, recall = 0, 0.0
    try:
        for b in range(0, images.shape[0], batch_size):
            cov = coverage[b : b + batch_size]
            state = backbone.init_tokens(normalise(images[b : b + batch_size]))
            if reference is not None:
                backbone.pruner.scores = reference_scores(
                    reference, cov, state.cls_index, generator
                )
            state = backbone.run_layers(state, 0, backbone.num_layers)
            logits = model.head(backbone.output(state, last))
            correct += int(
                (logits.argmax(1) == labels[b : b + batch_size]).sum()
            )
            kept = state.kept_mask()
            if state.cls_index is not None:
                i = state.cls_index
                kept = torch.cat([kept[:, :i], kept[:, i + 1 :]], 1)
            obj = cov >= OBJECT_COVERAGE
            hits = (kept & obj).sum(1) / obj.sum(1).clamp(min=1)
            recall += float(hits.sum())
    finally:
        backbone.pruner = pruner
    num = max(images.shape[0], 1)
    return 100.0 * correct / num, 100.0 * recall / num


def train_settings(model_name: str, args: argparse.Namespace) -> dict:
    """Everything that the trained dense weights depend on."""
    keys = (
        'seed',
        'epochs',
        'num_train',
        'image_size',
        'embed_dims',
        'depth',
        'batch_size',
        'lr',
        'threads',
    )
    return dict(
        model=model_name,
        generator_version=GENERATOR_VERSION,
        **{k: getattr(args, k) for k in keys},
    )


def load_trained(path: str, settings: dict) -> Optional[dict]:
    """A saved trained model, if ``path`` holds one of these settings."""
    if not osp.isfile(path):
        return None
    saved = torch.load(path, map_location='cpu', weights_only=True)
    keys = (
        'settings',
        'state_dict',
        'train_losses',
        'train_time_s',
    )
    if any(k not in saved for k in keys):
        print(f'{path} is incomplete: training again')
        return None
    if saved['settings'] != settings:
        print(f'{path} was trained with other settings: training again')
        return None
    return saved


def run_model(
    model_name: str,
    args: argparse.Namespace,
    data: Dict[str, Tuple[Tensor, Tensor]],
) -> dict:
    """Train one dense model and evaluate its zero-shot pruned variants.

    Returns:
        dict: ``train_time_s``, ``train_losses``, ``dense`` (top-1 %) and
        ``pruned``: one entry per (keep, metric) with the top-1 of each
        pruned variant and the tokens kept.
    """
    torch.manual_seed(args.seed)
    cfg = backbone_cfg(
        model_name, args.embed_dims, args.depth, args.image_size
    )
    num_classes = len(CLS_CLASSES)
    dense = SSMClassifier(backbone=cfg, num_classes=num_classes)
    params = sum(p.numel() for p in dense.parameters())
    key = train_settings(model_name, args)
    ckpt = None
    if args.work_dir:
        ckpt = osp.join(args.work_dir, f'{model_name}_dense.pth')
    saved = load_trained(ckpt, key) if ckpt else None
    if saved is not None:
        dense.load_state_dict(saved['state_dict'], strict=True)
        losses, train_time = saved['train_losses'], saved['train_time_s']
        # files of older versions of this tool did not record it
        train_cpu = saved.get('train_cpu_s')
        print(
            f'{model_name}: {params / 1e3:.0f}k parameters, loaded the '
            f'trained model from {ckpt} (trained in {train_time:.0f} s)',
            flush=True,
        )
    else:
        print(
            f'{model_name}: {params / 1e3:.0f}k parameters, training '
            f'{args.epochs} epochs on {len(data["train"][1])} images',
            flush=True,
        )
        start, start_cpu = time.perf_counter(), time.process_time()
        losses = train(
            dense,
            *data['train'],
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            log_every=args.log_every,
        )
        train_time = time.perf_counter() - start
        train_cpu = time.process_time() - start_cpu
        if ckpt:
            os.makedirs(args.work_dir, exist_ok=True)
            torch.save(
                dict(
                    settings=key,
                    state_dict=dense.state_dict(),
                    train_losses=losses,
                    train_time_s=train_time,
                    train_cpu_s=train_cpu,
                ),
                ckpt,
            )
    state_dict = dense.state_dict()
    test_images, test_labels, test_masks = data['test']
    # in eval mode: a forward in training mode would move the batch-norm
    # statistics (of the dense model and of state_dict, which shares them)
    with torch.no_grad():
        dense.eval()
        grid = dense.backbone.init_tokens(normalise(test_images[:1])).hw
    coverage = patch_coverage(test_masks, grid)
    test = (test_images, test_labels, coverage, args.batch_size)
    start = time.perf_counter()
    dense_top1, _ = evaluate(dense, *test)
    result = dict(
        params=params,
        loaded=saved is not None,
        train_time_s=round(train_time, 1),
        train_cpu_s=None if train_cpu is None else round(train_cpu, 1),
        train_losses=[round(v, 4) for v in losses],
        dense=dense_top1,
        pruned=[],
    )
    trained = ''
    if saved is None:
        trained = f'trained in {train_time:.0f} s, {train_cpu:.0f} s CPU '
    print(
        f'  {trained}(final loss {losses[-1]:.3f}); dense top-1 '
        f'{dense_top1:.1f}',
        flush=True,
    )
    for keep in args.keep:
        sched = schedule(args.depth, keep)
        for metric in args.metrics:
            entry = dict(keep=keep, metric=metric, **sched)
            reference = metric if metric in REFERENCES else None
            for name, extra in VARIANTS.items():
                if extra is None:
                    continue
                prune_cfg = dict(
                    sched, metric='clip' if reference else metric, **extra
                )
                model = SSMClassifier(
                    backbone=dict(cfg, prune_cfg=prune_cfg),
                    num_classes=num_classes,
                )
                model.load_state_dict(state_dict, strict=True)
                top1, recall = evaluate(
                    model, *test, reference=reference, seed=args.seed
                )
                entry[name] = top1
                entry[f'{name}_object_kept'] = recall
                kept, total = tokens_kept(model, test_images)
            entry.update(tokens_kept=kept, tokens=total)
            result['pruned'].append(entry)
    result['eval_time_s'] = round(time.perf_counter() - start, 1)
    return result


def table(results: Dict[str, dict]) -> str:
    """The markdown table of the results."""
    lines = [
        "| model | metric | dense top-1 | naive | aligned 'prev' "
        "| aligned 'null' | tokens kept | object tokens kept "
        "(naive / 'prev' / 'null') |",
        '|---|---|---|---|---|---|---|---|',
    ]
    for model_name, res in results.items():
        for e in res['pruned']:
            lines.append(
                f'| {model_name} | {e["metric"]} | {res["dense"]:.1f} '
                f'| {e["naive"]:.1f} | {e["prev"]:.1f} | {e["null"]:.1f} '
                f'| {e["tokens_kept"]}/{e["tokens"]} '
                f'({100 * e["tokens_kept"] / e["tokens"]:.0f}%) '
                f'| {e["naive_object_kept"]:.0f}% / '
                f'{e["prev_object_kept"]:.0f}% / '
                f'{e["null_object_kept"]:.0f}% |'
            )
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--models',
        nargs='+',
        choices=MODELS,
        default=list(MODELS),
        help='models to train. Defaults to both.',
    )
    parser.add_argument(
        '--epochs', type=int, default=8, help='training epochs (8)'
    )
    parser.add_argument('--seed', type=int, default=0, help='seed (0)')
    parser.add_argument(
        '--keep',
        type=float,
        nargs='+',
        default=[0.6],
        help='fraction of the tokens kept after the last of the two '
        'pruning steps; several values are evaluated on the same '
        'trained model (0.6)',
    )
    parser.add_argument(
        '--metrics',
        nargs='+',
        choices=METRICS + REFERENCES,
        default=['clip'],
        help="importance scores to evaluate: 'clip' (the paper's), 'l1', "
        "'l2', 'raw', or the reference selections 'oracle' (the patches "
        "the object covers most) and 'random' ('clip')",
    )
    parser.add_argument(
        '--num-train', type=int, default=3000, help='training images (3000)'
    )
    parser.add_argument(
        '--num-test', type=int, default=1200, help='test images (1200)'
    )
    parser.add_argument(
        '--image-size',
        type=int,
        default=128,
        help='image side; the models see (side / 16)^2 tokens (128)',
    )
    parser.add_argument(
        '--embed-dims', type=int, default=64, help='token channels (64)'
    )
    parser.add_argument('--depth', type=int, default=6, help='layers (6)')
    parser.add_argument(
        '--batch-size', type=int, default=64, help='batch size (64)'
    )
    parser.add_argument(
        '--lr', type=float, default=3e-3, help='peak learning rate (3e-3)'
    )
    parser.add_argument(
        '--threads', type=int, default=2, help='torch threads (2)'
    )
    parser.add_argument(
        '--log-every',
        type=int,
        default=0,
        help='print the loss every this many steps (0: never)',
    )
    parser.add_argument(
        '--work-dir',
        help='save each trained dense model here (<model>_dense.pth) and '
        'reuse it, instead of training again, when the training settings '
        'are the same (to evaluate other --keep or --metrics)',
    )
    parser.add_argument('--out', help='write the results to this JSON file')
    args = parser.parse_args(argv)
    for name in ('epochs', 'num_train', 'num_test', 'batch_size', 'threads'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1')
    if args.depth < 3:
        parser.error('--depth must be >= 3 (two pruning steps)')
    if args.image_size < 32:
        parser.error('--image-size must be >= 32')
    for keep in args.keep:
        if not 0 < keep <= 1:
            parser.error(f'--keep must be in (0, 1], got {keep}')
    if args.seed < 0:
        parser.error('--seed must be >= 0')
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
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
    print(
        f'synthetic set: {args.num_train} + {args.num_test} images of '
        f'{args.image_size}x{args.image_size}, {len(CLS_CLASSES)} classes, '
        f'made in {data_time:.0f} s',
        flush=True,
    )
    results = {m: run_model(m, args, data) for m in args.models}
    total_time = time.perf_counter() - start
    print()
    print(table(results))
    print()
    for model_name, res in results.items():
        cpu = res['train_cpu_s']
        cpu = '' if cpu is None else f' ({cpu:.0f} s CPU)'
        print(
            f'{model_name}: trained in {res["train_time_s"]:.0f} s{cpu}, '
            f'evaluated in {res["eval_time_s"]:.0f} s'
        )
    print(
        f'total {total_time:.0f} s ({args.threads} threads; chance '
        f'{100 / len(CLS_CLASSES):.1f}%)'
    )
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
        out_dir = osp.dirname(osp.abspath(args.out))
        os.makedirs(out_dir, exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump(report, f, indent=2)
        print(f'wrote {args.out}')
    return report


if __name__ == '__main__':
    main(sys.argv[1:])
