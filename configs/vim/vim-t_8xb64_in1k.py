"""Vim-T on ImageNet-1K at 224 x 224: the converted release, dense.

``load_from``: ``vim_t_midclstok_76p1acc.pth`` of hustvl/Vim, converted by
``tools/model_converters/vim2mmssm.py`` (the classifier's conversion, middle
class token kept: no ``--dense``). Paper (Table 1 of the pruning paper, FLOPs
in its 'vim' convention): 7 M params, 1.50 G FLOPs, 76.1% top-1. The data (with
repeated augmentation), the 30-epoch fine-tuning recipe that this config also
holds (its ``-prune`` and ``-naive`` configs'), the 8 x 64 batch and the
commands are in ``configs/vim/README.md``.
"""

_base_ = [
    '../_base_/models/vim_cls.py',
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    '../_base_/schedules/imagenet_finetune_30e_constant-lr.py',
    '../_base_/default_runtime_cls.py',
]
custom_imports = dict(
    imports=['mmssm.models', 'mmssm.engine'], allow_failed_imports=False
)
# Checkpoints record the backbone's pruning schedule in meta['pruning'].
custom_hooks = [dict(type='mmssm.PruningMetaHook')]

load_from = 'checkpoints/vim-t_in1k.pth'
model = dict(backbone=dict(arch='tiny'), head=dict(in_channels=192))
train_dataloader = dict(sampler=dict(type='RepeatAugSampler', shuffle=True))
