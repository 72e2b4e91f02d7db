"""Show which patches a token-pruned backbone keeps at each pruning step.

The config's model may be an ``mmssm.SSMClassifier``, a bare backbone, or a
detector/segmentor (or an adapter neck) whose ``backbone`` is an mmssm
backbone: the backbone config is found by following ``backbone`` keys from
``model``. Only the backbone is built (its ``init_cfg`` is dropped) and, if a
checkpoint is given, its weights are loaded from it with mmengine's
``load_checkpoint`` (the prefix of the backbone in the checkpoint,
``backbone.`` or ``backbone.backbone.``, follows the config). The image is
resized to ``--shape``, normalised with the ImageNet mean and std, and run
through the backbone's layers; after each pruning step the kept patches are
recorded. The PNG has one panel for the image and one per step, with the
pruned patches greyed out (as Figure A1 of "Exploring Token Pruning in
Vision State Space Models").

Example::

    python tools/analysis_tools/visualize_pruning.py demo.jpg \\
        configs/plainmamba/plainmamba-l1-prune_in1k.py l1-prune.pth \\
        --out pruning.png
    # a dense config, pruned with the paper's schedule
    python tools/analysis_tools/visualize_pruning.py demo.jpg CONFIG \\
        --out pruning.png --cfg-options model.backbone.prune_cfg=paper
"""

import argparse
import copy
import os
import os.path as osp
import re
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from mmengine.config import Config, DictAction

import mmssm  # noqa: F401  (allow-lists the types of mmengine checkpoints)
from mmssm.registry import MODELS

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
GREY = 200.0  # the colour of a pruned patch
GREY_ALPHA = 0.8  # how much of it covers the image


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('image', help='image file')
    parser.add_argument('config', help='config file')
    parser.add_argument(
        'checkpoint', nargs='?', help='checkpoint file (optional)'
    )
    parser.add_argument('--out', required=True, help='the PNG to write')
    parser.add_argument(
        '--shape',
        type=int,
        nargs='+',
        default=[224],
        help='input size: H, or H W. Defaults to 224.',
    )
    parser.add_argument(
        '--device', default='cpu', help='device to run on. Defaults to cpu.'
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, key=value',
    )
    args = parser.parse_args(argv)
    if len(args.shape) not in (1, 2):
        parser.error(f'--shape takes H or H W, got {args.shape}')
    if min(args.shape) < 1:
        parser.error(f'--shape must be positive, got {args.shape}')
    for name in ('image', 'config', 'checkpoint'):
        path = getattr(args, name)
        if path is not None and not osp.isfile(path):
            parser.error(f'{name} file not found: {path}')
    return args


def _is_mmssm_backbone(cfg: dict) -> bool:
    """Whether ``cfg`` builds a backbone with the token-state layer API."""
    typ = cfg.get('type')
    if isinstance(typ, str):
        try:
            typ = MODELS.get(typ)
        except Exception:  # another scope that cannot be imported
            typ = None
    return isinstance(typ, type) and all(
        hasattr(typ, name) for name in ('init_tokens', 'run_layers')
    )


def find_backbone_cfg(model_cfg: dict) -> Tuple[dict, str]:
    """The mmssm backbone in a model config, and its checkpoint prefix.

    Args:
        model_cfg (dict): ``cfg.model``.

    Returns:
        tuple[dict, str]: The backbone's config and the prefix of its
        weights in a checkpoint of the model ('' for a bare backbone,
        'backbone.' for a classifier or a detector, 'backbone.backbone.'
        for a backbone inside an adapter).
    """
    cfg, prefix = model_cfg, ''
    while True:
        if not isinstance(cfg, dict) or 'type' not in cfg:
            raise ValueError(
                'no mmssm backbone (PlainMamba, Vim) found in the config: '
                f'model.{prefix}type is missing'
            )
        if _is_mmssm_backbone(cfg):
            return cfg, prefix
        if 'backbone' not in cfg:
            raise ValueError(
                'no mmssm backbone (PlainMamba, Vim) found in the config: '
                f'model.{prefix}type is {cfg["type"]!r} and it has no '
                f'backbone'
            )
        cfg, prefix = cfg['backbone'], prefix + 'backbone.'


def build_backbone(
    cfg: Config, checkpoint: Optional[str] = None
) -> Tuple[nn.Module, str]:
    """Build the backbone of ``cfg.model`` and load its weights.

    Args:
        cfg (Config): The config.
        checkpoint (str, optional): A checkpoint of the config's model (or
            of the bare backbone). Defaults to None (random weights).

    Returns:
        tuple[nn.Module, str]: The backbone in eval mode and the path of
        its config in ``model`` (e.g. 'model.backbone').
    """
    from mmengine.model import revert_sync_batchnorm
    from mmengine.runner import load_checkpoint

    backbone_cfg, prefix = find_backbone_cfg(cfg.model)
    backbone_cfg = copy.deepcopy(dict(backbone_cfg))
    backbone_cfg.pop('init_cfg', None)
    backbone = revert_sync_batchnorm(MODELS.build(backbone_cfg))
    if checkpoint is not None:
        revise = [(r'^module\.', ''), ('^' + re.escape(prefix), '')]
        ckpt = load_checkpoint(
            backbone,
            checkpoint,
            map_location='cpu',
            strict=False,
            revise_keys=revise,
        )
        state = ckpt.get('state_dict', ckpt)
        keys = set(state)
        for pattern, repl in revise:
            keys = {re.sub(pattern, repl, k) for k in keys}
        if not keys & set(backbone.state_dict()):
            raise ValueError(
                f'no weight of {checkpoint} matches the backbone (its '
                f'prefix there was taken to be {prefix!r})'
            )
    path = 'model' + ''.join('.backbone' for _ in prefix.split('.')[:-1])
    return backbone.eval(), path


def load_image(path: str, shape: Tuple[int, int]) -> np.ndarray:
    """An RGB image resized to ``shape`` (H, W), uint8 (H, W, 3)."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert('RGB').resize(
            (shape[1], shape[0]), Image.Resampling.BILINEAR
        )
        return np.asarray(img, dtype=np.uint8).copy()


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, H, W) normalised with ImageNet stats."""
    x = torch.from_numpy(image).float().permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return ((x - mean) / std)[None]


@torch.no_grad()
def record_steps(
    backbone: nn.Module, x: torch.Tensor
) -> List[Tuple[int, np.ndarray]]:
    """Run the backbone's layers and record the kept patches of each step.

    Args:
        backbone (nn.Module): A PlainMamba or Vim with a pruning schedule.
        x (Tensor): (1, 3, H, W) input.

    Returns:
        list[tuple[int, ndarray]]: Per pruning step, the 1-based layer after
        which it runs and the (h, w) bool map of the kept patches.
    """
    pruner = backbone.pruner
    state = backbone.init_tokens(x)
    steps = []
    for i in range(backbone.num_layers):
        state = backbone.run_layers(state, i, i + 1)
        if pruner.step_after(i) is None:
            continue
        kept = state.kept_mask()[0]
        if state.cls_index is not None:  # the class token is not a patch
            kept = torch.cat(
                [kept[: state.cls_index], kept[state.cls_index + 1 :]]
            )
        steps.append((i + 1, kept.reshape(state.hw).cpu().numpy()))
    return steps


def patch_stride(backbone: nn.Module) -> int:
    """Pixels between patch centres (16 for PlainMamba and Vim)."""
    return int(getattr(getattr(backbone, 'patch_embed', None), 'stride', 16))


def mask_image(image: np.ndarray, kept: np.ndarray, stride: int) -> np.ndarray:
    """Grey out the pruned patches of an (H, W, 3) image."""
    H, W = image.shape[:2]
    full = np.repeat(np.repeat(kept, stride, 0), stride, 1)
    full = np.pad(
        full,
        ((0, max(H - full.shape[0], 0)), (0, max(W - full.shape[1], 0))),
        constant_values=True,
    )[:H, :W]
    alpha = np.where(full, 0.0, GREY_ALPHA)[..., None]
    out = image.astype(np.float32) * (1 - alpha) + GREY * alpha
    return out.round().clip(0, 255).astype(np.uint8)


def draw(
    image: np.ndarray,
    steps: List[Tuple[int, np.ndarray]],
    stride: int,
    out: str,
    title: str = '',
) -> None:
    """Write the panels (the image, then one per step) to a PNG."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    n = 1 + len(steps)
    H, W = image.shape[:2]
    width = 3.0
    height = width * H / W + 0.5
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    axes = axes[0]
    axes[0].imshow(image)
    axes[0].set_title(f'input {H}x{W}', fontsize=9)
    total = steps[0][1].size if steps else 0
    for ax, (layer, kept) in zip(axes[1:], steps):
        ax.imshow(mask_image(image, kept, stride))
        ax.set_title(
            f'after layer {layer}: {int(kept.sum())}/{total} kept',
            fontsize=9,
        )
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> List[Tuple[int, int]]:
    """Run the tool.

    Args:
        argv (Sequence[str], optional): Command-line arguments; None reads
            ``sys.argv``. Defaults to None.

    Returns:
        list[tuple[int, int]]: Per pruning step, the layer and the number
        of kept patches.
    """
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    try:
        backbone, path = build_backbone(cfg, args.checkpoint)
    except ValueError as e:
        sys.exit(f'{args.config}: {e}')
    if getattr(backbone, 'pruner', None) is None:
        sys.exit(
            f'the backbone of {args.config} ({path}) prunes no token: set '
            f'its prune_cfg, e.g. --cfg-options {path}.prune_cfg=paper'
        )
    if args.checkpoint is None:
        print('no checkpoint given: the backbone has random weights')
    shape = tuple(args.shape) * (3 - len(args.shape))
    image = load_image(args.image, shape)
    backbone.to(args.device)
    steps = record_steps(backbone, to_tensor(image).to(args.device))
    pruner = backbone.pruner
    title = (
        f'{type(backbone).__name__}: prune after layers {pruner.layers}, '
        f'keep {pruner.keep_ratios}, metric {pruner.metric!r}, '
        f'{"aligned" if pruner.align else "naive"}'
    )
    draw(image, steps, patch_stride(backbone), args.out, title)
    summary = [(layer, int(kept.sum())) for layer, kept in steps]
    for layer, count in summary:
        print(f'after layer {layer}: {count} patches kept')
    print(f'written: {args.out}')
    return summary


if __name__ == '__main__':
    main()
