"""Vim-T on ImageNet-1K at 224 x 224: the converted release, dense.

Evaluates the released weights converted with ``python
tools/model_converters/vim2mmssm.py vim_t_midclstok_76p1acc.pth
checkpoints/vim-t_in1k.pth`` (``load_from``; the classifier's
conversion, middle class token kept: no ``--dense``) on mmpretrain's
ImageNet layout under ``data/imagenet/``::

    python tools/test.py configs/vim/vim-t_8xb64_in1k.py \\
        checkpoints/vim-t_in1k.pth

Data as mmpretrain's DeiT-style ImageNet base (train: random resized crop,
flip, RandAugment m9-mstd0.5, random erasing 0.25; test: resize to 256,
bicubic, centre crop 224), repeated augmentation (DeiT's sampler, on in
Vim's code); label smoothing and Mixup/CutMix from the model fragment. The
config also holds the 30-epoch fine-tuning recipe of its ``-prune`` and
``-naive`` configs (Vim's fine-tuning defaults at a constant lr,
``configs/_base_/schedules/imagenet_finetune_30e_constant-lr.py``):
training it fine-tunes the dense model for the same budget, from
``load_from``.

8 GPUs x 64 images (``8xb64``, a total batch of 512, which the lr is set
for); with another setup pass ``--auto-scale-lr``.

Paper (Table 1 of "Exploring Token Pruning in Vision State Space Models"):
7 M params, 1.50 G FLOPs (multiply-accumulates, scan convention 'vim':
3*K*E*N per direction), 76.1% top-1.
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
