"""Show which patches a token-pruned backbone keeps at each pruning step.

The config's model may be a classifier (mmpretrain's ``ImageClassifier``), a
bare backbone, or a detector/segmentor whose ``backbone`` (possibly inside an
adapter) is an mmssm backbone: only that backbone is built, with its weights
from the checkpoint if one is given. The image is resized to ``--shape`` and
normalised with the ImageNet mean and std; a step hook of the backbone's pruner
records the kept patches of each step. The PNG has one panel for the image and
one per step with the pruned patches greyed out (as Figure A1 of "Exploring
Token Pruning in Vision State Space Models").

Example::

    python tools/analysis_tools/visualize_pruning.py demo.jpg \\
        configs/plainmamba/plainmamba-l1-prune_8xb64-30e_in1k.py \\
        checkpoints/plainmamba-l1_in1k.pth --out pruning.png
    # a dense config, pruned with the paper's schedule
    python tools/analysis_tools/visualize_pruning.py demo.jpg CONFIG \\
        --out pruning.png --cfg-options model.backbone.prune_cfg=paper
"""

import argparse
import copy
import os
import os.path as osp
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from mmengine.config import Config, DictAction

import mmssm  # noqa: F401  (allow-lists the types of mmengine checkpoints)
from mmssm.errors import UserError
from mmssm.registry import MODELS
from mmssm.utils.cli import exit_on_user_error
from mmssm.utils.fileio import atomic_savefig

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
GREY = 200.0  # the colour of a pruned patch
GREY_ALPHA = 0.8  # how much of it covers the image

#: Per pruning step: the 1-based layer it follows, the (h, w) bool map of
#: the kept patches and the pixels per patch.
Step = Tuple[int, np.ndarray, int]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('image', help='image file')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', nargs='?', help='checkpoint (optional)')
    parser.add_argument('--out', required=True, help='the PNG to write')
    parser.add_argument(
        '--shape',
        type=int,
        nargs='+',
        default=[224],
        help='input size: H, or H W. Defaults to 224.',
    )
    parser.add_argument('--device', default='cpu', help='Defaults to cpu.')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, key=value',
    )
    args = parser.parse_args(argv)
    if len(args.shape) not in (1, 2) or min(args.shape) < 1:
        parser.error(f'--shape takes H or H W, positive, got {args.shape}')
    for name in ('image', 'config', 'checkpoint'):
        path = getattr(args, name)
        if path is not None and not osp.isfile(path):
            parser.error(f'{name} file not found: {path}')
    return args


def _is_mmssm_backbone(cfg: dict) -> bool:
    """Whether ``cfg`` builds a backbone with a token pruner."""
    try:
        typ = MODELS.get(cfg['type'])
    except Exception:  # a type of another scope that cannot be imported
        return False
    return isinstance(typ, type) and hasattr(typ, 'run_layers')


def find_backbone_cfg(model_cfg: dict) -> Tuple[dict, str]:
    """The mmssm backbone in a model config, and its checkpoint prefix.

    Args:
        model_cfg (dict): ``cfg.model``.

    Returns:
        tuple[dict, str]: The backbone's config and the prefix of its
        weights in a checkpoint of the model ('' for a bare backbone,
        'backbone.' in a classifier or a detector, 'backbone.backbone.'
        inside an adapter).
    """
    cfg, prefix = model_cfg, ''
    while isinstance(cfg, dict) and 'type' in cfg:
        if _is_mmssm_backbone(cfg):
            return cfg, prefix
        cfg, prefix = cfg.get('backbone'), prefix + 'backbone.'
    raise UserError(
        'no mmssm backbone (PlainMamba, Vim) found in the config along '
        f'model.{prefix}'
    )


def build_backbone(
    cfg: Config, checkpoint: Optional[str]
) -> Tuple[nn.Module, str]:
    """The backbone of ``cfg.model`` in eval mode, with the checkpoint's
    weights (of the whole model or of the bare backbone) if given, and its
    prefix (see :func:`find_backbone_cfg`)."""
    from mmengine.model import revert_sync_batchnorm
    from mmengine.runner import load_checkpoint

    backbone_cfg, prefix = find_backbone_cfg(cfg.model)
    backbone_cfg = dict(copy.deepcopy(dict(backbone_cfg)), init_cfg=None)
    backbone = revert_sync_batchnorm(MODELS.build(backbone_cfg))
    if checkpoint is not None:
        # the rest of the model (a head, a neck) is left out: not strict
        revise = [(r'^module\.', ''), ('^' + re.escape(prefix), '')]
        ckpt = load_checkpoint(
            backbone, checkpoint, 'cpu', strict=False, revise_keys=revise
        )
        names = {re.sub(r'^module\.', '', k) for k in ckpt['state_dict']}
        if not names & {prefix + k for k in backbone.state_dict()}:
            raise UserError(
                f'no weight of {checkpoint} matches the backbone (its '
                f'prefix there was taken to be {prefix!r})'
            )
    return backbone.eval(), prefix


def load_image(path: str, shape: Tuple[int, int]) -> np.ndarray:
    """An RGB image resized to ``shape`` (H, W), uint8 (H, W, 3)."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert('RGB').resize((shape[1], shape[0]))
        return np.asarray(img, dtype=np.uint8).copy()


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, H, W) normalised with ImageNet stats."""
    x = torch.from_numpy(image).float().permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return ((x - mean) / std)[None]


@torch.no_grad()
def record_steps(backbone: nn.Module, x: torch.Tensor) -> List[Step]:
    """Run the backbone on ``x`` (1, 3, H, W) and record every pruning
    step's kept patches through a step hook of its pruner."""
    steps = []

    def hook(pruner, step, before, after, scores):
        kept = after.patch_kept_mask()[0].cpu().numpy()
        steps.append((pruner.layers[step], kept, after.patch_stride))

    handle = backbone.pruner.register_step_hook(hook)
    try:
        backbone(x)
    finally:
        handle.remove()
    return steps


def mask_image(image: np.ndarray, kept: np.ndarray, stride: int) -> np.ndarray:
    """Grey out the pruned patches of an (H, W, 3) image."""
    H, W = image.shape[:2]
    full = np.kron(kept, np.ones((stride, stride), bool))
    pad = ((0, max(H - full.shape[0], 0)), (0, max(W - full.shape[1], 0)))
    full = np.pad(full, pad, constant_values=True)[:H, :W]
    alpha = np.where(full, 0.0, GREY_ALPHA)[..., None]
    out = image.astype(np.float32) * (1 - alpha) + GREY * alpha
    return out.round().clip(0, 255).astype(np.uint8)


def draw(image: np.ndarray, steps: List[Step], out: str, title: str) -> None:
    """Write the panels (the image, then one per step) to a PNG."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    H, W = image.shape[:2]
    n = 1 + len(steps)
    fig, axes = plt.subplots(
        1, n, figsize=(3.0 * n, 3.0 * H / W + 0.5), squeeze=False
    )
    axes[0][0].imshow(image)
    axes[0][0].set_title(f'input {H}x{W}', fontsize=9)
    for ax, (layer, kept, stride) in zip(axes[0][1:], steps):
        ax.imshow(mask_image(image, kept, stride))
        ax.set_title(
            f'after layer {layer}: {int(kept.sum())}/{kept.size} kept',
            fontsize=9,
        )
    for ax in axes[0]:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    atomic_savefig(out, fig, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> List[Tuple[int, int]]:
    """Draw the steps; returns the layer and kept patches of each."""
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    backbone, prefix = build_backbone(cfg, args.checkpoint)
    backbone.to(args.device)
    pruner = backbone.pruner
    if pruner is None:
        raise UserError(
            f'the backbone of {args.config} prunes no token: set its '
            f'prune_cfg, e.g. --cfg-options model.{prefix}prune_cfg=paper'
        )
    if args.checkpoint is None:
        print('no checkpoint given: the backbone has random weights')
    image = load_image(args.image, tuple(args.shape) * (3 - len(args.shape)))
    steps = record_steps(backbone, to_tensor(image).to(args.device))
    title = (
        f'{type(backbone).__name__}: prune after layers {pruner.layers}, '
        f'keep {pruner.keep_ratios}, scorer {pruner.scorer_cfg!r}, '
        f'{"aligned" if pruner.align else "naive"}'
    )
    draw(image, steps, args.out, title)
    return [(layer, int(kept.sum())) for layer, kept, _ in steps]


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> List[Tuple[int, int]]:
    """Run the tool; returns the layer and kept patches of each step."""
    args = parse_args(argv)
    summary = run(args)
    for layer, count in summary:
        print(f'after layer {layer}: {count} patches kept')
    print(f'written: {args.out}')
    return summary


if __name__ == '__main__':
    main()
