"""Draw a detector's predictions on one image beside its pruned-token maps.

Runs an mmdet detector (a config and its checkpoint) on one image, as
``mmdet.apis.inference_detector`` does (the config's test pipeline), and
writes one PNG with, left to right:

* the ground truth, if ``--ann-file`` (a COCO json holding the image, found
  by its file name) is given;
* the predicted boxes and masks above ``--score-thr`` (mmdet's
  ``DetLocalVisualizer``);
* one panel per pruning step of the token-pruned backbone: the image with
  the tokens pruned by then greyed out, as the detector saw them on this
  very image (inside the ViT-Adapter, between its interactions).

The kept tokens are recorded by wrapping the backbone's pruner
(``TokenPruner.prune``) while the detector runs; a backbone without a
pruner gives no pruning panel.

Example::

    python tools/analysis_tools/visualize_detection.py CONFIG CKPT \\
        data/synthetic/shapes-128/val/000000.png --out vis.png \\
        --ann-file data/synthetic/shapes-128/annotations/instances_val.json
"""

import argparse
import json
import os
import os.path as osp
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.config import Config, DictAction

import mmssm  # noqa: F401  (allow-lists mmengine checkpoint types)

GREY = 200.0  # the colour of a pruned token
GREY_ALPHA = 0.75  # how much of it covers the image
MIN_PANEL = 384  # panels are drawn at least this many pixels high


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='detector config file')
    parser.add_argument('checkpoint', help='checkpoint of the detector')
    parser.add_argument('image', help='image file')
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
    for name in ('config', 'checkpoint', 'image', 'ann_file'):
        path = getattr(args, name)
        if path is not None and not osp.isfile(path):
            parser.error(f'{name} file not found: {path}')
    return args


def find_pruned_backbone(model: torch.nn.Module):
    """The module with a ``pruner`` along ``model.backbone(.backbone)*``."""
    module = getattr(model, 'backbone', None)
    while module is not None:
        if getattr(module, 'pruner', None) is not None:
            return module
        module = getattr(module, 'backbone', None)
    return None


class PruningRecorder:
    """Records the kept tokens of each pruning step of a backbone.

    Wraps ``backbone.pruner.prune`` on the instance (the class is not
    touched); :meth:`remove` restores it. Each record is ``(layer, kept)``:
    the 1-based layer after which the step ran and the (B, h, w) bool map
    of the tokens kept after it.
    """

    def __init__(self, backbone: torch.nn.Module) -> None:
        self.pruner = backbone.pruner
        self.records: List[Tuple[int, torch.Tensor]] = []
        self._prune = self.pruner.prune
        self.pruner.prune = self._record

    def _record(self, state, ssm_out, step):
        state = self._prune(state, ssm_out, step)
        kept = state.kept_mask()
        if state.cls_index is not None:  # a class token is not a patch
            c = state.cls_index
            kept = torch.cat([kept[:, :c], kept[:, c + 1 :]], dim=1)
        self.records.append(
            (self.pruner.layers[step], kept.reshape(-1, *state.hw).cpu())
        )
        return state

    def remove(self) -> None:
        del self.pruner.prune  # back to the class's method


def kept_to_image(
    kept: np.ndarray, stride: int, img_shape, ori_shape
) -> np.ndarray:
    """A (h, w) token map as an (H, W) bool map of the original image.

    Token (i, j) covers pixels ``[s*i, s*(i+1)) x [s*j, s*(j+1))`` of the
    network input (resized, then padded at the bottom/right); the map is
    cropped to the resized image and resized to the original one.
    """
    import cv2

    full = np.repeat(np.repeat(kept, stride, 0), stride, 1)
    h, w = img_shape[:2]
    full = np.pad(
        full,
        ((0, max(h - full.shape[0], 0)), (0, max(w - full.shape[1], 0))),
        mode='edge',
    )[:h, :w]
    H, W = ori_shape[:2]
    return cv2.resize(
        full.astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST
    ).astype(bool)


def grey_out(image: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Grey the pixels of an (H, W, 3) image where ``kept`` is False."""
    alpha = np.where(kept, 0.0, GREY_ALPHA)[..., None]
    out = image.astype(np.float32) * (1 - alpha) + GREY * alpha
    return out.round().clip(0, 255).astype(np.uint8)


def _upscale(image: np.ndarray, instances, factor: int):
    """The image and instances (boxes, masks) scaled by an int factor."""
    import cv2

    if factor == 1:
        return image, instances
    H, W = image.shape[:2]
    image = cv2.resize(
        image, (W * factor, H * factor), interpolation=cv2.INTER_NEAREST
    )
    instances = instances.clone()
    if 'bboxes' in instances:
        instances.bboxes = instances.bboxes * factor
    if 'masks' in instances:
        masks = instances.masks
        if hasattr(masks, 'to_ndarray'):  # BitmapMasks
            masks = masks.to_ndarray()
        if isinstance(masks, torch.Tensor):
            masks = masks.cpu().numpy()
        masks = np.asarray(masks).astype(bool)
        masks = masks.repeat(factor, 1).repeat(factor, 2)
        instances.masks = masks
    return image, instances


def gt_instances(ann_file: str, image_path: str, classes: Sequence[str]):
    """The COCO annotations of an image as mmdet ``InstanceData``."""
    from mmengine.structures import InstanceData
    from pycocotools import mask as mask_utils

    with open(ann_file) as f:
        coco = json.load(f)
    name = osp.basename(image_path)
    images = [
        i for i in coco['images'] if osp.basename(i['file_name']) == name
    ]
    if not images:
        raise ValueError(f'{ann_file} has no image named {name}')
    img = images[0]
    cat_names = {c['id']: c['name'] for c in coco['categories']}
    boxes, labels, masks = [], [], []
    for ann in coco['annotations']:
        if ann['image_id'] != img['id'] or ann.get('iscrowd', 0):
            continue
        name = cat_names[ann['category_id']]
        if name not in classes:
            continue
        x, y, w, h = ann['bbox']
        boxes.append([x, y, x + w, y + h])
        labels.append(list(classes).index(name))
        rles = mask_utils.frPyObjects(
            ann['segmentation'], img['height'], img['width']
        )
        masks.append(mask_utils.decode(mask_utils.merge(rles)).astype(bool))
    inst = InstanceData()
    inst.bboxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    inst.labels = torch.tensor(labels, dtype=torch.long)
    inst.masks = (
        np.stack(masks)
        if masks
        else np.zeros((0, img['height'], img['width']), bool)
    )
    return inst


def draw_instances(
    visualizer, image: np.ndarray, instances, pred: bool, thr: float
) -> np.ndarray:
    """``image`` (RGB) with the instances drawn by DetLocalVisualizer."""
    from mmdet.structures import DetDataSample

    sample = DetDataSample()
    if pred:
        sample.pred_instances = instances
    else:
        sample.gt_instances = instances
    visualizer.add_datasample(
        'image',
        image,
        sample,
        draw_gt=not pred,
        draw_pred=pred,
        pred_score_thr=thr,
        show=False,
    )
    return visualizer.get_image()


def run(args: argparse.Namespace) -> dict:
    """Run the detector and write the figure; returns a summary."""
    from mmdet.apis import inference_detector, init_detector
    from mmdet.visualization import DetLocalVisualizer
    from PIL import Image

    from mmssm.utils.setup_env import config_task, register_modules

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if config_task(cfg) != 'mmdet':
        raise ValueError(f'{args.config} is not an mmdet config')
    register_modules('mmdet')
    model = init_detector(cfg, args.checkpoint, device=args.device)
    model.eval()
    backbone = find_pruned_backbone(model)
    recorder = PruningRecorder(backbone) if backbone is not None else None
    try:
        with torch.no_grad():
            result = inference_detector(model, args.image)
    finally:
        if recorder is not None:
            recorder.remove()

    with Image.open(args.image) as img:
        image = np.asarray(img.convert('RGB')).copy()
    H, W = image.shape[:2]
    factor = max(1, -(-MIN_PANEL // min(H, W)))
    meta = result.metainfo
    classes = tuple(model.dataset_meta['classes'])
    visualizer = DetLocalVisualizer(name=f'visualize_detection_{os.getpid()}')
    visualizer.dataset_meta = model.dataset_meta

    panels = []  # (title, RGB image)
    if args.ann_file:
        gt = gt_instances(args.ann_file, args.image, classes)
        big, gt = _upscale(image, gt, factor)
        panels.append(
            (
                f'ground truth: {len(gt)} objects',
                draw_instances(visualizer, big, gt, False, 0),
            )
        )
    pred = result.pred_instances.cpu()
    num = int((pred.scores >= args.score_thr).sum())
    big, scaled = _upscale(image, pred, factor)
    panels.append(
        (
            f'prediction: {num} with score >= {args.score_thr:g}',
            draw_instances(visualizer, big, scaled, True, args.score_thr),
        )
    )
    steps = []
    if recorder is not None:
        stride = int(getattr(backbone.patch_embed, 'stride', 16))
        for layer, kept in recorder.records:
            kept = kept[0].numpy()
            steps.append((layer, int(kept.sum()), kept.size))
            full = kept_to_image(kept, stride, meta['img_shape'], (H, W))
            big = np.repeat(
                np.repeat(grey_out(image, full), factor, 0), factor, 1
            )
            panels.append(
                (
                    f'after layer {layer}: {int(kept.sum())}/{kept.size} '
                    f'tokens kept',
                    big,
                )
            )
    title = args.title
    if recorder is not None:
        pruner = backbone.pruner
        title = (title + '\n' if title else '') + (
            f'{type(backbone).__name__}: pruned after layers '
            f'{list(pruner.layers)}, keep {list(pruner.keep_ratios)}, '
            f'{"aligned" if pruner.align else "naive"} scan; '
            f'grey = pruned tokens'
        )
    save_figure(panels, args.out, title)
    return dict(
        num_predictions=num,
        steps=steps,
        out=args.out,
    )


def save_figure(panels, out: str, title: str = '') -> None:
    """Write the panels side by side, each with its title, to a PNG."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    n = len(panels)
    h, w = panels[0][1].shape[:2]
    width = 4.0
    fig, axes = plt.subplots(
        1, n, figsize=(width * n, width * h / w + 0.9), squeeze=False
    )
    for ax, (name, image) in zip(axes[0], panels):
        ax.imshow(image, interpolation='nearest')
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the tool; returns the number of predictions and the steps."""
    args = parse_args(argv)
    try:
        summary = run(args)
    except ValueError as e:
        sys.exit(f'error: {e}')
    print(
        f'{summary["num_predictions"]} predictions with score >= '
        f'{args.score_thr:g}'
    )
    for layer, kept, total in summary['steps']:
        print(f'after layer {layer}: {kept}/{total} tokens kept')
    print(f'written: {args.out}')
    return summary


if __name__ == '__main__':
    main()
