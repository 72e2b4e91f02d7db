"""DyVM-PlainMamba-L1 (ours: DyVM has no PlainMamba release): learned token
pruning and direction selection over PlainMamba's four zig-zag scans.

The predictor runs after layers 3, 6, 9 (1-based) and keeps 0.7, 0.49,
0.343 of the patch tokens (``prune_cfg='dyvm'`` schedule of L1); no class
token, so the direction gates read the mean of the kept tokens. Trained
with DyVM's losses and teacher (the dense L1 from the same checkpoint).
``align=False``: PlainMamba's 2-D conv and four grid orders admit no
rearrangement, so the tokens stay in place and each scan skips the masked
steps (the compact scan of the kept tokens); the ``-align`` config scans
them aligned instead.

DyVM's recipe family (``configs/_base_/schedules/dyvm_30e.py``) at a total
batch of 512 (8 GPUs x 64 images) with DyVM-Vim-S's lr per image (5e-5 for
512). No figures exist to compare with.
"""

_base_ = [
    '../_base_/models/plainmamba_cls.py',
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    '../_base_/schedules/dyvm_30e.py',
    '../_base_/default_runtime_cls.py',
]
# DyVMClassifier subclasses mmpretrain's ImageClassifier: its module is a
# plug-in, not imported by mmssm.models
custom_imports = dict(
    imports=[
        'mmssm.models',
        'mmssm.models.classifiers.dyvm_classifier',
        'mmssm.engine',
    ],
    allow_failed_imports=False,
)
# Checkpoints record the backbone's pruning schedule in meta['pruning'].
custom_hooks = [dict(type='mmssm.PruningMetaHook')]

ckpt = 'checkpoints/plainmamba-l1_in1k.pth'  # noqa
load_from = ckpt
model = dict(
    type='mmssm.DyVMClassifier',
    backbone=dict(
        arch='l1',
        prune_cfg=dict(type='mmssm.LearnedTokenPruner', schedule='dyvm'),
        direction_gate=True,
    ),
    head=dict(in_channels=192),
    token_ratio_loss=dict(type='mmssm.TokenRatioLoss', loss_weight=10.0),
    direction_ratio_loss=dict(
        type='mmssm.DirectionRatioLoss', target=0.8, loss_weight=10.0
    ),
    distill_kl_loss=dict(type='mmssm.LogitDistillLoss', loss_weight=0.5),
    distill_tokens_loss=dict(type='mmssm.TokenDistillLoss', loss_weight=0.5),
    teacher=dict(checkpoint=ckpt),
)
optim_wrapper = dict(optimizer=dict(lr=5e-5))
param_scheduler = [
    dict(_base_.param_scheduler[0], start_factor=1e-5 / 5e-5),
    _base_.param_scheduler[1],
]
auto_scale_lr = dict(base_batch_size=512)
