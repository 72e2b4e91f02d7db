"""PlainMamba-L2 on ImageNet-1K at 224 x 224: the converted release, dense.

Evaluates the released weights converted with ``python
tools/model_converters/plainmamba2mmssm.py l2.pth
checkpoints/plainmamba-l2_in1k.pth`` (``load_from``; ``l2.pth`` of
ChenhongyiYang/PlainMamba) on mmpretrain's ImageNet layout under
``data/imagenet/``::

    python tools/test.py configs/plainmamba/plainmamba-l2_8xb64_in1k.py \\
        checkpoints/plainmamba-l2_in1k.pth

Data as mmpretrain's DeiT-style ImageNet base (train: random resized crop,
flip, RandAugment m9-mstd0.5, random erasing 0.25; test: resize to 256,
bicubic, centre crop 224); label smoothing and Mixup/CutMix from the model
fragment. The config also holds the 30-epoch fine-tuning recipe of its
``-prune`` and ``-naive`` configs (ToP's for PlainMamba,
``configs/_base_/schedules/imagenet_finetune_30e.py``): training it
fine-tunes the dense model for the same budget, from ``load_from``.

8 GPUs x 64 images (``8xb64``, a total batch of 512, which the lr is set
for); with another setup pass ``--auto-scale-lr``.

Paper (Table 1 of "Exploring Token Pruning in Vision State Space Models"):
25 M params, 8.1 G FLOPs (multiply-accumulates, scan convention
'plainmamba': 9*K*E*N per direction), 81.6% top-1.
"""

_base_ = [
    '../_base_/models/plainmamba_cls.py',
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    '../_base_/schedules/imagenet_finetune_30e.py',
    '../_base_/default_runtime_cls.py',
]
custom_imports = dict(
    imports=['mmssm.models', 'mmssm.engine'], allow_failed_imports=False
)
# Checkpoints record the backbone's pruning schedule in meta['pruning'].
custom_hooks = [dict(type='mmssm.PruningMetaHook')]

load_from = 'checkpoints/plainmamba-l2_in1k.pth'
model = dict(backbone=dict(arch='l2'), head=dict(in_channels=384))
