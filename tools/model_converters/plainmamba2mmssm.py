"""Convert an official PlainMamba ImageNet checkpoint to mmssm.

The official checkpoints (``l1.pth``, ``l2.pth``, ``l3.pth`` of
ChenhongyiYang/PlainMamba) are mmcls 0.x checkpoints; the output loads
strictly into ``SSMClassifier(backbone=dict(type='PlainMamba', arch=...))``
and, with ``prefix='backbone.'``, into the backbone alone.

Example::

    python tools/model_converters/plainmamba2mmssm.py l1.pth \
        plainmamba-l1_in1k.pth
"""

import argparse
import hashlib
import os
import os.path as osp
import sys
import tempfile

import torch

import mmssm  # noqa: F401  (allow-lists the types of mmengine checkpoints)
from mmssm.models.utils.ckpt_convert import convert_plainmamba
from mmssm.version import __version__


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='the official checkpoint (.pth)')
    parser.add_argument('dst', help='where to write the mmssm checkpoint')
    return parser.parse_args(argv)


def sha256sum(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def save_atomic(obj: dict, dst: str) -> None:
    """``torch.save`` to a temporary file next to ``dst``, then rename."""
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
        checkpoint = torch.load(
            args.src, map_location='cpu', weights_only=True
        )
    except Exception as e:  # unpickling errors name the refused global
        sys.exit(
            f'error: cannot load {args.src} with weights_only=True '
            f'({type(e).__name__}: {e})'
        )
    try:
        state_dict = convert_plainmamba(checkpoint)
    except (KeyError, TypeError) as e:
        sys.exit(
            f'error: {args.src} is not a PlainMamba checkpoint that '
            f'can be converted: {e}'
        )
    meta = dict(
        converter='plainmamba2mmssm',
        mmssm_version=__version__,
        source=osp.basename(args.src),
        source_sha256=sha256sum(args.src),
        model='SSMClassifier(backbone=PlainMamba)',
    )
    try:
        save_atomic(dict(state_dict=state_dict, meta=meta), args.dst)
    except OSError as e:
        sys.exit(f'error: cannot write {args.dst}: {e}')
    print(f'{args.src} -> {args.dst}: {len(state_dict)} tensors')


if __name__ == '__main__':
    main()
