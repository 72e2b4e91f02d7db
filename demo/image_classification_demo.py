"""Classify one image with an mmssm classifier and print its top-k classes.

The config is an mmpretrain config of mmssm (``configs/plainmamba``,
``configs/vim``): the model is built by mmpretrain's ``get_model``, the
checkpoint loaded strictly (a checkpoint of another model is refused, naming
the keys) and the image classified by mmpretrain's
``ImageClassificationInferencer`` (the config's test pipeline). Class names
come from the checkpoint's ``meta['dataset_meta']`` (every training
checkpoint has it) or else from the config's test dataset (mmpretrain's
``ImageNet``: the 1000 ImageNet classes). Example, with a converted release::

    python tools/model_converters/plainmamba2mmssm.py l1.pth \\
        checkpoints/plainmamba-l1_in1k.pth
    python demo/image_classification_demo.py data/images/color.jpg \\
        configs/plainmamba/plainmamba-l1_8xb64_in1k.py \\
        checkpoints/plainmamba-l1_in1k.pth

It prints one line per class: rank, score, class index and name.
"""

import argparse
import os.path as osp
from typing import List, Optional, Sequence, Tuple

import mmcv
import torch
from mmengine.config import Config, DictAction
from mmengine.registry import DefaultScope

import mmssm  # noqa: F401  (allow-lists mmengine checkpoint types)
from mmssm.errors import UserError
from mmssm.utils.checkpoint import load_checkpoint_strict
from mmssm.utils.cli import exit_on_user_error
from mmssm.utils.preflight import config_task


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('img', help='image file')
    parser.add_argument('config', help='mmpretrain config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--device',
        default='cuda:0' if torch.cuda.is_available() else 'cpu',
        help="device, e.g. 'cpu' or 'cuda:0'. Defaults to cuda:0 if there "
        'is a GPU, else cpu.',
    )
    parser.add_argument(
        '--topk', type=int, default=5, help='classes to print. Defaults to 5.'
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, key=value',
    )
    return parser.parse_args(argv)


def classify(
    img: str, cfg: Config, checkpoint: str, device: str, topk: int
) -> List[Tuple[float, int, str]]:
    """The top-k (score, class index, class name) of ``img``, best first.

    Raises:
        UserError: If the checkpoint does not fit the config's model, or
            ``topk`` is not in [1, classes].
    """
    from mmpretrain.apis import ImageClassificationInferencer, get_model

    model = get_model(cfg, device=device)  # class names: the test dataset's
    checkpoint_meta = load_checkpoint_strict(model, checkpoint).get('meta')
    dataset_meta = (checkpoint_meta or {}).get('dataset_meta')
    if dataset_meta:
        model._dataset_meta = dataset_meta  # what get_model would keep
    inferencer = ImageClassificationInferencer(model, device=device)
    (result,) = inferencer(img)
    scores = torch.as_tensor(result['pred_scores'])
    if not 1 <= topk <= scores.numel():
        raise UserError(f'--topk must be in [1, {scores.numel()}], got {topk}')
    classes = inferencer.classes
    values, indices = scores.topk(topk)
    return [
        (
            float(v),
            int(i),
            str(classes[i]) if classes and i < len(classes) else '',
        )
        for v, i in zip(values, indices)
    ]


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> List[Tuple[float, int, str]]:
    args = parse_args(argv)
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
    if task != 'mmpretrain':
        raise UserError(
            f'{args.config} is a {task} config: this demo classifies with '
            'mmpretrain configs (demo/image_demo.py draws detections and '
            'segmentations)'
        )
    # mmpretrain's scope for this run only (the inferencer's pipeline): a
    # caller in the same process keeps its own
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        top = classify(args.img, cfg, args.checkpoint, args.device, args.topk)
    print(f'{args.img}: top-{args.topk}')
    for rank, (score, index, name) in enumerate(top, 1):
        print(f'{rank}. {score:.4f}  {index:4d}  {name}')
    return top


if __name__ == '__main__':
    main()
