"""Convert an official Vim (hustvl/Vim) ImageNet checkpoint to mmssm.

The official checkpoints (``vim_t_midclstok_76p1acc.pth`` and the like) are
DeiT-style ``{'model': ..., 'model_ema': ...}`` files. Without ``--dense``
the output loads strictly into ``SSMClassifier(backbone=dict(type='Vim',
arch=...))`` (middle class token kept); with ``--dense`` it is for a dense
prediction backbone ``Vim(arch=..., cls_token=None, final_norm=False)``
loaded with ``init_cfg=dict(type='Pretrained', checkpoint=...,
prefix='backbone.')``: the class slot is taken out of ``pos_embed`` and
``cls_token``, ``norm_f`` and the head are dropped.

Example::

    python tools/model_converters/vim2mmssm.py \
        vim_s_midclstok_80p5acc.pth vim-s_in1k.pth
    python tools/model_converters/vim2mmssm.py --dense \
        vim_s_midclstok_80p5acc.pth vim-s_in1k-dense.pth
"""

import argparse
import hashlib
import os
import os.path as osp
import sys
import tempfile

import torch

import mmssm  # noqa: F401  (allow-lists the types of mmengine checkpoints)
from mmssm.models.utils.ckpt_convert import convert_vim
from mmssm.version import __version__


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='the official checkpoint (.pth)')
    parser.add_argument('dst', help='where to write the mmssm checkpoint')
    parser.add_argument(
        '--dense',
        action='store_true',
        help='convert for a detection/segmentation backbone without the '
        'class token (default: for the ImageNet classifier)',
    )
    return parser.parse_args(argv)


def sha256sum(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def save_atomic(obj: dict, dst: str) -> None:
    """Write ``obj`` to a temporary file beside ``dst``, then rename it."""
    folder = osp.dirname(osp.abspath(dst))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-', suffix='.pth')
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
        os.replace(tmp, dst)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


def main(argv=None) -> None:
    args = parse_args(argv)
    if not osp.isfile(args.src):
        sys.exit(f'error: {args.src}: no such file')
    try:
        # The official files also hold the training arguments, an
        # argparse.Namespace: allow-list that one plain type, keep the
        # safety on.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(
                args.src, map_location='cpu', weights_only=True
            )
    except Exception as e:  # an unpickling error names the refused global
        sys.exit(
            f'error: cannot load {args.src} with weights_only=True '
            f'({type(e).__name__}: {e})'
        )
    try:
        state_dict = convert_vim(checkpoint, dense=args.dense)
    except (KeyError, TypeError) as e:
        sys.exit(
            f'error: {args.src} is not a Vim checkpoint that can be '
            f'converted: {e}'
        )
    target = (
        "Vim(cls_token=None, final_norm=False), prefix 'backbone.'"
        if args.dense
        else "SSMClassifier(backbone=Vim(cls_token='middle'))"
    )
    meta = dict(
        converter='vim2mmssm',
        mmssm_version=__version__,
        source=osp.basename(args.src),
        source_sha256=sha256sum(args.src),
        dense=args.dense,
        model=target,
    )
    try:
        save_atomic(dict(state_dict=state_dict, meta=meta), args.dst)
    except OSError as e:
        sys.exit(f'error: cannot write {args.dst}: {e}')
    print(f'{args.src} -> {args.dst}: {len(state_dict)} tensors')


if __name__ == '__main__':
    main()
