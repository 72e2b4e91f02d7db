"""Convert an official PlainMamba ImageNet checkpoint to mmssm.

The official checkpoints (``l1.pth``, ``l2.pth``, ``l3.pth`` of
ChenhongyiYang/PlainMamba) are mmcls 0.x checkpoints; the output loads
strictly into the ImageNet classifiers of ``configs/plainmamba`` (mmpretrain's
``ImageClassifier``: ``backbone.*``, ``head.fc.*``; their ``load_from`` is
``checkpoints/plainmamba-l*_in1k.pth``) and, with ``prefix='backbone.'``,
into the backbone alone (the ``ckpt`` of the detection and segmentation
configs).

Example::

    python tools/model_converters/plainmamba2mmssm.py l1.pth \
        checkpoints/plainmamba-l1_in1k.pth
"""

import mmssm  # noqa: F401  (allow-lists the types of mmengine checkpoints)
from mmssm.models.utils.ckpt_convert import (
    convert_file,
    convert_plainmamba,
    converter_parser,
)
from mmssm.utils.cli import exit_on_user_error


def parse_args(argv=None):
    return converter_parser(__doc__.splitlines()[0]).parse_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    convert_file(
        args.src,
        args.dst,
        convert_plainmamba,
        source='PlainMamba',
        converter='plainmamba2mmssm',
        meta=dict(
            model='ImageClassifier(backbone=PlainMamba, head=LinearClsHead)'
        ),
    )


if __name__ == '__main__':
    main()
