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
import os.path as osp
import warnings
from typing import Optional

import mmcv
import torch
from mmengine.config import Config, DictAction
from mmengine.logging import print_log
from mmengine.registry import DefaultScope

import mmssm  # noqa: F401  (allow-lists mmengine checkpoint types)
from mmssm.errors import UserError
from mmssm.utils.checkpoint import load_checkpoint_strict
from mmssm.utils.cli import exit_on_user_error
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
        UserError: If the file cannot be loaded as a checkpoint.
    """
    try:
        try:
            checkpoint = torch.load(
                filename, map_location='cpu', weights_only=True, mmap=True
            )
        except RuntimeError:  # not a zip file: no mmap (old format)
            checkpoint = torch.load(
                filename, map_location='cpu', weights_only=True
            )
    except Exception as e:  # corrupt file, refused pickle global...
        raise UserError(
            f'cannot load checkpoint {filename!r} ({type(e).__name__}: {e})'
        ) from None
    if not isinstance(checkpoint, dict):
        raise UserError(f'{filename!r} holds no checkpoint dict')
    meta = checkpoint.get('meta')
    return meta if isinstance(meta, dict) else None


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
        out_file=args.out_file,
    )
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
        show_result_pyplot(
            model,
            args.img,
            result,
            opacity=args.opacity,
            title='result',
            draw_gt=False,
            show=False,
            out_file=args.out_file,
        )
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
