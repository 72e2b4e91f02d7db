"""Vim-B on ImageNet-1K at 224 x 224: the converted release, dense.

``load_from``: ``vim_b_midclstok_81p9acc.pth`` of hustvl/Vim, converted by
``tools/model_converters/vim2mmssm.py`` (the classifier's conversion, middle
class token kept: no ``--dense``). Vim's release: 98 M params, 81.9% top-1; the
pruning paper has no Vim-B. The data (with repeated augmentation), the 30-epoch
fine-tuning recipe that this config also holds (its ``-prune`` and ``-naive``
configs'), the 8 x 64 batch and the commands are in ``configs/vim/README.md``.
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

load_from = 'checkpoints/vim-b_in1k.pth'
model = dict(backbone=dict(arch='base'), head=dict(in_channels=768))
train_dataloader = dict(sampler=dict(type='RepeatAugSampler', shuffle=True))
