"""PlainMamba-L2 on ImageNet-1K at 224 x 224: the converted release, dense.

``load_from``: ``l2.pth`` of ChenhongyiYang/PlainMamba, converted by
``tools/model_converters/plainmamba2mmssm.py``. Paper (Table 1 of the pruning
paper, FLOPs in its 'plainmamba' convention): 25 M params, 8.1 G FLOPs, 81.6%
top-1. The data, the 30-epoch fine-tuning recipe that this config also holds
(its ``-prune`` and ``-naive`` configs'), the 8 x 64 batch and the commands are
in ``configs/plainmamba/README.md``.
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
