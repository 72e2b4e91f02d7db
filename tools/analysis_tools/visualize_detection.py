"""Draw a detector's predictions on images beside its pruned-token maps.

Runs an mmdet detector (a config and its checkpoint) on one or more images
with mmdet's ``inference_detector`` (the config's test pipeline) and writes
one PNG with a row per image, left to right: the ground truth if
``--ann-file`` (a COCO json holding the image, matched by file name and
read with pycocotools) is given; the predictions above ``--score-thr``
(mmdet's ``DetLocalVisualizer``); and one panel per pruning step of the
token-pruned backbone, the tokens pruned by then greyed out, as a step hook
of its pruner saw them while the detector ran on this very image. A
learned pruner (DyVM's predictor) keeps different tokens in each image.

Example::

    python tools/analysis_tools/visualize_detection.py CONFIG CKPT \\
        data/synthetic/shapes-128/val/000000.png \\
        data/synthetic/shapes-128/val/000001.png --out vis.png \\
        --ann-file data/synthetic/shapes-128/annotations/instances_val.json
"""

import argparse
import contextlib
import io
import os
import os.path as osp
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.config import Config, DictAction

import mmssm  # noqa: F401  (allow-lists mmengine checkpoint types)
from mmssm.errors import UserError
from mmssm.utils.cli import exit_on_user_error
from mmssm.utils.fileio import atomic_savefig

GREY = 200.0  # the colour of a pruned token
GREY_ALPHA = 0.75  # how much of it covers the image
MIN_PANEL = 384  # panels are drawn at least this many pixels high


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='detector config file')
    parser.add_argument('checkpoint', help='checkpoint of the detector')
    parser.add_argument('image', nargs='+', help='image file(s)')
    parser.add_argument('--out', required=True, help='the PNG to write')
    parser.add_argument(
        '--ann-file',
        help='COCO json with the image (matched by file name): adds a '
        'ground-truth panel',
    )
    parser.add_argument(
        '--score-thr',
        type=float,
        default=0.3,
        help='draw predictions with at least this score. Defaults to 0.3.',
    )
    parser.add_argument('--title', default='', help='title of the figure')
    parser.add_argument('--device', default='cpu', help='Defaults to cpu.')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, key=value',
    )
    args = parser.parse_args(argv)
    for name in ('config', 'checkpoint', 'image', 'ann_file'):
        paths = getattr(args, name)
        for path in paths if isinstance(paths, list) else [paths]:
            if path is not None and not osp.isfile(path):
                parser.error(f'{name} file not found: {path}')
    return args


def find_pruner(model: torch.nn.Module) -> Tuple[Optional[str], object]:
    """The name of the backbone that prunes along ``model.backbone
    (.backbone)*`` and its pruner, or (None, None)."""
    module = getattr(model, 'backbone', None)
    while module is not None:
        if getattr(module, 'pruner', None) is not None:
            return type(module).__name__, module.pruner
        module = getattr(module, 'backbone', None)
    return None, None


def kept_to_image(
    kept: np.ndarray, stride: int, img_shape, ori_shape
) -> np.ndarray:
    """An (h, w) token map as an (H, W) bool map of the original image.

    Token (i, j) covers pixels ``[s*i, s*(i+1)) x [s*j, s*(j+1))`` of the
    network input (resized, then padded at the bottom/right); the map is
    cropped to the resized image and resized to the original one.
    """
    import mmcv

    h, w = img_shape[:2]
    full = np.kron(kept, np.ones((stride, stride), np.uint8))
    pad = ((0, max(h - full.shape[0], 0)), (0, max(w - full.shape[1], 0)))
    full = np.pad(full, pad, mode='edge')[:h, :w]
    size = (ori_shape[1], ori_shape[0])
    return mmcv.imresize(full, size, interpolation='nearest').astype(bool)


def grey_out(image: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Grey the pixels of an (H, W, 3) image where ``kept`` is False."""
    alpha = np.where(kept, 0.0, GREY_ALPHA)[..., None]
    out = image.astype(np.float32) * (1 - alpha) + GREY * alpha
    return out.round().clip(0, 255).astype(np.uint8)


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """An (H, W, ...) array repeated ``factor`` times along H and W."""
    return image.repeat(factor, 0).repeat(factor, 1)


def gt_instances(ann_file: str, image_path: str, classes: Sequence[str]):
    """The COCO annotations of an image (not crowds, of the model's
    classes) as mmdet ``InstanceData``, read with pycocotools."""
    from mmengine.structures import InstanceData
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
        coco = COCO(ann_file)
    name = osp.basename(image_path)
    ids = [
        i
        for i, img in coco.imgs.items()
        if osp.basename(img['file_name']) == name
    ]
    if not ids:
        raise UserError(f'{ann_file} has no image named {name}')
    img = coco.imgs[ids[0]]
    names = {c['id']: c['name'] for c in coco.loadCats(coco.getCatIds())}
    anns = [
        a
        for a in coco.loadAnns(coco.getAnnIds(imgIds=ids[0]))
        if not a.get('iscrowd', 0) and names[a['category_id']] in classes
    ]
    inst = InstanceData()
    boxes = [[x, y, x + w, y + h] for x, y, w, h in (a['bbox'] for a in anns)]
    inst.bboxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = [list(classes).index(names[a['category_id']]) for a in anns]
    inst.labels = torch.tensor(labels, dtype=torch.long)
    masks = [coco.annToMask(a) for a in anns]
    shape = (len(anns), img['height'], img['width'])
    inst.masks = torch.from_numpy(
        np.stack(masks) if masks else np.zeros(shape, np.uint8)
    ).bool()
    return inst


def draw_instances(visualizer, image, instances, factor, pred, thr):
    """``image`` (RGB) with the instances drawn by DetLocalVisualizer,
    both scaled by ``factor`` first (so that labels and lines stay fine)."""
    from mmdet.structures import DetDataSample

    instances = instances.clone()
    instances.bboxes = instances.bboxes * factor
    if 'masks' in instances:  # not for a box-only detector
        masks = torch.as_tensor(instances.masks).cpu()
        masks = masks.repeat_interleave(factor, 1)
        instances.masks = masks.repeat_interleave(factor, 2)
    sample = DetDataSample()
    if pred:
        sample.pred_instances = instances
    else:
        sample.gt_instances = instances
    visualizer.add_datasample('image', upscale(image, factor), sample,
                              draw_gt=not pred, draw_pred=pred,
                              pred_score_thr=thr, show=False)  # fmt: skip
    return visualizer.get_image()


def save_figure(
    rows: List[List[Tuple[str, np.ndarray]]], out: str, title: str
):
    """Write the panels to a PNG, each row of panels side by side (one row
    per image), each panel with its title."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    n = max(len(panels) for panels in rows)
    h, w = rows[0][0][1].shape[:2]
    fig, axes = plt.subplots(
        len(rows),
        n,
        figsize=(4.0 * n, (4.0 * h / w + 0.4) * len(rows) + 0.5),
        squeeze=False,
    )
    for ax_row, panels in zip(axes, rows):
        for ax in ax_row:
            ax.set_axis_off()
        for ax, (name, image) in zip(ax_row, panels):
            ax.imshow(image, interpolation='nearest')
            ax.set_title(name, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    atomic_savefig(out, fig, dpi=100)
    plt.close(fig)


def describe_pruner(name: str, pruner) -> str:
    """One line on the figure: where the pruner prunes and how."""
    from mmssm.models.pruning import LearnedTokenPruner

    if isinstance(pruner, LearnedTokenPruner):
        how = 'learned (DyVM), ' + (
            'aligned scan' if pruner.align else 'rearranged'
        )
    else:
        how = f'{"aligned" if pruner.align else "naive"} scan'
    return (
        f'{name}: pruned after layers {list(pruner.layers)}, keep '
        f'{list(pruner.keep_ratios)}, {how}; grey = pruned tokens'
    )


def run(args: argparse.Namespace) -> dict:
    """Run the detector on each image and write the figure; returns a
    summary per image."""
    import mmcv
    from mmdet.apis import inference_detector, init_detector
    from mmdet.visualization import DetLocalVisualizer

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if cfg.get('default_scope') != 'mmdet':
        raise UserError(f'{args.config} is not an mmdet config')
    model = init_detector(cfg, args.checkpoint, device=args.device).eval()
    name, pruner = find_pruner(model)
    classes = tuple(model.dataset_meta['classes'])
    visualizer = DetLocalVisualizer.get_instance('visualize_detection')
    visualizer.dataset_meta = model.dataset_meta
    records = []  # (layer, (h, w) kept tokens, pixels per token)

    def hook(pruner, step, before, after, scores):
        kept = after.patch_kept_mask()[0].cpu().numpy()
        records.append((pruner.layers[step], kept, after.patch_stride))

    rows, summaries = [], []
    for path in args.image:
        records.clear()
        handle = pruner.register_step_hook(hook) if pruner else None
        try:
            with torch.no_grad():
                result = inference_detector(model, path)
        finally:
            if handle is not None:
                handle.remove()
        image = mmcv.imread(path, channel_order='rgb')
        factor = max(1, -(-MIN_PANEL // min(image.shape[:2])))
        panels = []  # (title, RGB image)
        if args.ann_file:
            gt = gt_instances(args.ann_file, path, classes)
            drawn = draw_instances(visualizer, image, gt, factor, False, 0)
            panels.append((f'ground truth: {len(gt)} objects', drawn))
        pred = result.pred_instances.cpu()
        num = int((pred.scores >= args.score_thr).sum())
        drawn = draw_instances(visualizer, image, pred, factor, True,
                               args.score_thr)  # fmt: skip
        panels.append((f'prediction: {num} with score >= '
                       f'{args.score_thr:g}', drawn))  # fmt: skip
        steps = []
        for layer, kept, stride in records:
            full = kept_to_image(
                kept, stride, result.metainfo['img_shape'], image.shape
            )
            steps.append((layer, int(kept.sum()), kept.size))
            panels.append((
                f'after layer {layer}: {int(kept.sum())}/{kept.size} kept',
                upscale(grey_out(image, full), factor),
            ))  # fmt: skip
        if len(args.image) > 1:  # which image the row is
            panels[0] = (f'{osp.basename(path)}: {panels[0][0]}', panels[0][1])
        rows.append(panels)
        summaries.append(dict(image=path, num_predictions=num, steps=steps))
    title = args.title
    described = describe_pruner(name, pruner) if pruner else None
    if described:
        title = (title + '\n' if title else '') + described
    save_figure(rows, args.out, title)
    return dict(images=summaries, pruner=described, out=args.out)


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the tool; returns the number of predictions and the steps of
    each image."""
    args = parse_args(argv)
    summary = run(args)
    for image in summary['images']:
        print(
            f'{image["image"]}: {image["num_predictions"]} predictions '
            f'with score >= {args.score_thr:g}'
        )
        for layer, kept, total in image['steps']:
            print(f'  after layer {layer}: {kept}/{total} tokens kept')
    print(f'written: {args.out}')
    return summary


if __name__ == '__main__':
    main()
