"""Convert a released DyVM-Vim (NUS-HPC-AI-Lab/DyVM) checkpoint to mmssm.

The released DyVM-Vim-T/S/B classifiers are DeiT-style ``{'model': ...}``
files: Vim's keys plus the token predictors (``score_predictors.*``) and
the direction gates (``layers.{i}.mixer.block_head.*``). The output loads
strictly into the ``configs/dyvm`` DyVM-Vim configs; a key that cannot be
mapped stops the conversion with an error that lists it.

Example::

    python tools/model_converters/dyvm2mmssm.py \
        dyvm_vim_small.pth checkpoints/dyvm-vim-s_in1k.pth
    python tools/test.py configs/dyvm/dyvm_vim-s_8xb32-30e_in1k.py \
        checkpoints/dyvm-vim-s_in1k.pth
"""

import argparse

import mmssm  # noqa: F401  (allow-lists the types of mmengine checkpoints)
from mmssm.models.utils.ckpt_convert import convert_file, converter_parser
from mmssm.models.utils.dyvm_convert import convert_dyvm_vim
from mmssm.utils.cli import exit_on_user_error


def parse_args(argv=None):
    return converter_parser(__doc__.splitlines()[0]).parse_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    convert_file(
        args.src,
        args.dst,
        convert_dyvm_vim,
        source='DyVM-Vim',
        converter='dyvm2mmssm',
        meta=dict(
            model="DyVMClassifier(backbone=Vim(cls_token='middle', "
            "prune_cfg='dyvm', direction_gate=True), head=LinearClsHead)"
        ),
        # the released files hold the training arguments, an
        # argparse.Namespace: allow-list that one plain type
        safe_globals=[argparse.Namespace],
    )


if __name__ == '__main__':
    main()
