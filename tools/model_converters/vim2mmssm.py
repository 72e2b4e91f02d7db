"""Convert an official Vim (hustvl/Vim) ImageNet checkpoint to mmssm.

The official checkpoints (``vim_t_midclstok_76p1acc.pth`` and the like) are
DeiT-style ``{'model': ..., 'model_ema': ...}`` files. Without ``--dense``
the output loads strictly into the ImageNet classifiers of ``configs/vim``
(mmpretrain's ``ImageClassifier``, middle class token kept; their
``load_from`` is ``checkpoints/vim-*_in1k.pth``); with ``--dense`` it is for
a dense prediction backbone ``Vim(arch=..., cls_token=None, final_norm=False)``
loaded with ``init_cfg=dict(type='Pretrained', checkpoint=...,
prefix='backbone.')``: the class slot is taken out of ``pos_embed`` and
``cls_token``, ``norm_f`` and the head are dropped.

Example::

    python tools/model_converters/vim2mmssm.py \
        vim_s_midclstok_80p5acc.pth checkpoints/vim-s_in1k.pth
    python tools/model_converters/vim2mmssm.py --dense \
        vim_s_midclstok_80p5acc.pth checkpoints/vim-s_in1k-dense.pth
"""

import argparse
from functools import partial

import mmssm  # noqa: F401  (allow-lists the types of mmengine checkpoints)
from mmssm.models.utils.ckpt_convert import (
    convert_file,
    convert_vim,
    converter_parser,
)
from mmssm.utils.cli import exit_on_user_error


def parse_args(argv=None):
    parser = converter_parser(__doc__.splitlines()[0])
    parser.add_argument(
        '--dense',
        action='store_true',
        help='convert for a detection/segmentation backbone without the '
        'class token (default: for the ImageNet classifier)',
    )
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    target = (
        "Vim(cls_token=None, final_norm=False), prefix 'backbone.'"
        if args.dense
        else "ImageClassifier(backbone=Vim(cls_token='middle'), "
        'head=LinearClsHead)'
    )
    convert_file(
        args.src,
        args.dst,
        partial(convert_vim, dense=args.dense),
        source='Vim',
        converter='vim2mmssm',
        meta=dict(dense=args.dense, model=target),
        # The official files also hold the training arguments, an
        # argparse.Namespace: allow-list that one plain type, keep the
        # safety on.
        safe_globals=[argparse.Namespace],
    )


if __name__ == '__main__':
    main()
