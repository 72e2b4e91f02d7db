"""Run a detector or a segmentor of mmssm on one image and save the result.

The config's ``default_scope`` decides the toolbox: an mmdet config runs
through mmdet's ``init_detector`` and ``inference_detector`` and is drawn
by its ``DetLocalVisualizer`` (boxes, masks, class names and scores); an
mmseg config runs through mmseg's ``init_model`` and ``inference_model``
and is drawn by ``show_result_pyplot`` (the label map over the image).
Class names and palette come from the checkpoint's ``meta['dataset_meta']``
(mmengine saves it in every training checkpoint). Examples::

    python demo/image_demo.py data/images/color.jpg \\
        configs/mask_rcnn/<config>.py <checkpoint>.pth --out-file det.png
    python demo/image_demo.py data/images/color.jpg \\
        configs/upernet/<config>.py <checkpoint>.pth --out-file seg.png

A checkpoint whose weights do not fit the config's model (missing or
unexpected keys, other shapes) is refused, naming the keys.
"""

import argparse
import logging
import os
import os.path as osp
import warnings
from typing import Optional

import cv2
import mmcv
import numpy as np
import torch
from mmengine.config import Config, DictAction
from mmengine.logging import print_log
from mmengine.registry import DefaultScope

import mmssm  # noqa: F401  (allow-lists mmengine checkpoint types)
from mmssm.errors import UserError
from mmssm.utils.checkpoint import load_checkpoint_strict, read_checkpoint
from mmssm.utils.cli import exit_on_user_error
from mmssm.utils.fileio import atomic_write
from mmssm.utils.preflight import config_task


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('img', help='image file')
    parser.add_argument('config', help='mmdet or mmseg config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--out-file',
        help='where to write the drawn result (PNG or JPEG); defaults to '
        'outputs/<image name>.png',
    )
    parser.add_argument(
        '--device',
        default='cuda:0' if torch.cuda.is_available() else 'cpu',
        help="device, e.g. 'cpu' or 'cuda:0'. Defaults to cuda:0 if there "
        'is a GPU, else cpu.',
    )
    parser.add_argument(
        '--score-thr',
        type=float,
        default=0.3,
        help='mmdet: draw the detections scoring at least this. '
        'Defaults to 0.3.',
    )
    parser.add_argument(
        '--opacity',
        type=float,
        default=0.5,
        help='mmseg: opacity of the drawn label map, in (0, 1]. '
        'Defaults to 0.5.',
    )
    parser.add_argument(
        '--palette',
        default='none',
        help="mmdet: colours of the classes ('coco', 'random', ...); "
        "'none' takes the checkpoint's or the config's. Defaults to none.",
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, key=value',
    )
    return parser.parse_args(argv)


def read_meta(filename: str) -> Optional[dict]:
    """The ``meta`` of a checkpoint (None if it has none).

    The file is memory-mapped, so its tensors are not read.

    Raises:
        UserError: If the file cannot be loaded as a checkpoint (one line
            naming it and what is wrong, :func:`read_checkpoint`).
    """
    checkpoint = read_checkpoint(filename, mmap=True)
    if not isinstance(checkpoint, dict):
        raise UserError(f'{filename!r} holds no checkpoint dict')
    meta = checkpoint.get('meta')
    return meta if isinstance(meta, dict) else None


def write_image(path: str, rgb: np.ndarray) -> None:
    """Write a drawing (RGB) to ``path``, whole or not at all."""
    ok, data = cv2.imencode(osp.splitext(path)[1] or '.png', rgb[..., ::-1])
    if not ok:
        raise UserError(f'cannot encode the drawing as {path!r}')
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    atomic_write(path, data.tobytes())


def check_image_size(cfg: Config, image: np.ndarray, path: str) -> None:
    """Refuse an image that the test pipeline's resize would make empty.

    A ``Resize`` that keeps the aspect ratio fits the image into its
    ``scale``: a very elongated image (7 x 3000 into 128 x 128) gets a side
    of 0 pixels, and OpenCV fails inside ``cv2.resize`` naming no file.

    Raises:
        UserError: Naming the image, its size and the resize of the config.
    """
    h, w = image.shape[:2]
    pipeline = cfg.get('test_dataloader', {}).get('dataset', {})
    for step in pipeline.get('pipeline') or cfg.get('test_pipeline') or []:
        scale = step.get('scale')
        if str(step.get('type')).split('.')[-1] != 'Resize' or not scale:
            continue
        if not step.get('keep_ratio', False):
            continue
        new_w, new_h = mmcv.rescale_size((w, h), tuple(scale))
        if min(new_w, new_h) < 1:
            raise UserError(
                f'image {path!r} ({w}x{h} pixels) is too elongated for the '
                f"config's test pipeline: fitted into {tuple(scale)} it "
                f'would be {new_w}x{new_h} pixels'
            )


def report_pruning(model: torch.nn.Module, meta: Optional[dict]) -> None:
    """Log the model's pruning; warn if the checkpoint recorded another."""
    from mmssm.engine.hooks import format_pruning, pruning_meta

    built = pruning_meta(model)
    print_log(f'token pruning: {format_pruning(built)}', logger='current')
    saved = (meta or {}).get('pruning')
    if saved is not None and saved != built:
        print_log(
            f'the checkpoint was saved with another token pruning '
            f'({format_pruning(saved)}); the results are those of the '
            f"config's",
            logger='current',
            level=logging.WARNING,
        )


def run_detector(cfg: Config, args, meta: Optional[dict]) -> None:
    from mmdet.apis import inference_detector, init_detector
    from mmdet.registry import VISUALIZERS

    model = init_detector(
        cfg, args.checkpoint, palette=args.palette, device=args.device
    )
    load_checkpoint_strict(model, args.checkpoint)
    report_pruning(model, meta)
    result = inference_detector(model, args.img)
    # the drawing is written to --out-file; no other storage backend
    visualizer = VISUALIZERS.build(
        dict(model.cfg.visualizer, vis_backends=None, save_dir=None)
    )
    visualizer.dataset_meta = model.dataset_meta
    visualizer.add_datasample(
        'result',
        mmcv.imread(args.img, channel_order='rgb'),
        data_sample=result,
        draw_gt=False,
        show=False,
        pred_score_thr=args.score_thr,
    )
    write_image(args.out_file, visualizer.get_image())
    num = int((result.pred_instances.scores >= args.score_thr).sum())
    print(f'{num} detection(s) scoring >= {args.score_thr}')


def run_segmentor(cfg: Config, args, meta: Optional[dict]) -> None:
    from mmseg.apis import inference_model, init_model, show_result_pyplot

    if not 0 < args.opacity <= 1:
        raise UserError(f'--opacity must be in (0, 1], got {args.opacity}')
    if meta is None:  # init_model reads checkpoint['meta'] unconditionally
        raise UserError(
            f"checkpoint {args.checkpoint!r} has no 'meta', which mmseg's "
            'init_model needs (training checkpoints and the files of '
            'tools/model_converters/publish_model.py have it)'
        )
    model = init_model(cfg, args.checkpoint, device=args.device)
    load_checkpoint_strict(model, args.checkpoint)
    report_pruning(model, meta)
    result = inference_model(model, args.img)
    with warnings.catch_warnings():  # it asks for a save_dir: not needed
        warnings.filterwarnings('ignore', 'Failed to add')
        drawn = show_result_pyplot(
            model,
            args.img,
            result,
            opacity=args.opacity,
            title='result',
            draw_gt=False,
            show=False,
        )
    write_image(args.out_file, drawn)
    labels = result.pred_sem_seg.data.unique().tolist()
    classes = model.dataset_meta['classes']
    names = [classes[i] if i < len(classes) else str(i) for i in labels]
    print(f'classes in the result: {", ".join(names)}')


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.out_file is None:
        stem = osp.splitext(osp.basename(args.img))[0]
        args.out_file = osp.join('outputs', f'{stem}.png')
    for what, path in (
        ('image', args.img),
        ('config file', args.config),
        ('checkpoint', args.checkpoint),
    ):
        if not osp.isfile(path):
            raise UserError(f'{what} {path!r} does not exist')
    try:  # fail here, not deep in the pipeline
        image = mmcv.imread(args.img)
    except Exception as e:
        raise UserError(f'cannot read image {args.img!r}: {e}') from e
    if image is None:
        raise UserError(
            f'cannot read image {args.img!r}: the file is corrupt, '
            'truncated or not an image'
        )
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    check_image_size(cfg, image, args.img)
    task = config_task(cfg)
    meta = read_meta(args.checkpoint)
    run = dict(mmdet=run_detector, mmseg=run_segmentor).get(task)
    if run is None:
        raise UserError(f'the demo does not draw results of {task} models')
    # the config's scope for this run only (its registries import their
    # modules): a caller in the same process keeps its own
    with DefaultScope.overwrite_default_scope(task):
        run(cfg, args, meta)
    print(f'result written to {args.out_file}')


if __name__ == '__main__':
    main()
