"""DyVM-Vim-S: Vim-S with DyVM's learned token pruning and scan-direction
selection, fine-tuned on ImageNet-1K (the released recipe).

Dynamic Vision Mamba (arXiv 2504.04787; NUS-HPC-AI-Lab/DyVM), as
released: a learned predictor before the 0-based layers 6, 12, 18 keeps
0.7, 0.49, 0.343 of the 196 patch tokens (hard Gumbel-softmax decisions in
training, the top 137 / 96 / 67 at inference), the kept tokens rearranged
(``align=False``: the compact scan at inference); a direction gate in every
layer (target 0.8 of the directions kept). Losses: cross-entropy (Mixup /
CutMix with label smoothing 0.1), token ratio (weight 10), direction ratio
(weight 10), distillation from the frozen dense Vim-S (0.5 x (KL of the
logits + MSE of the final kept tokens)).

Fine-tuned from the converted dense checkpoint (``load_from``; the teacher
loads the same file)::

    python tools/model_converters/vim2mmssm.py vim_s_midclstok_80p5acc.pth \\
        checkpoints/vim-s_in1k.pth
    python tools/train.py configs/dyvm/dyvm_vim-s_8xb32-30e_in1k.py

8 GPUs x 32 images (``8xb32``, the released total batch of 256; lr 5e-5
scaled by 256 / 512); with another setup pass ``--auto-scale-lr``.
The released converted DyVM-Vim-S weights (``dyvm2mmssm.py``) evaluate
with ``tools/test.py`` and this config.

Paper: 78.8% top-1 (dense Vim-S 80.5), FLOPs -35.2% as DyVM counts them
(with the measured direction keep, about 0.89).
"""

_base_ = [
    '../_base_/models/vim_cls.py',
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

ckpt = 'checkpoints/vim-s_in1k.pth'  # noqa
load_from = ckpt
model = dict(
    type='mmssm.DyVMClassifier',
    backbone=dict(
        arch='small',
        prune_cfg=dict(type='mmssm.LearnedTokenPruner', schedule='dyvm'),
        direction_gate=True,
    ),
    head=dict(in_channels=384),
    token_ratio_loss=dict(type='mmssm.TokenRatioLoss', loss_weight=10.0),
    direction_ratio_loss=dict(
        type='mmssm.DirectionRatioLoss', target=0.8, loss_weight=10.0
    ),
    distill_kl_loss=dict(type='mmssm.LogitDistillLoss', loss_weight=0.5),
    distill_tokens_loss=dict(type='mmssm.TokenDistillLoss', loss_weight=0.5),
    teacher=dict(checkpoint=ckpt),
)
train_dataloader = dict(
    batch_size=32, sampler=dict(type='RepeatAugSampler', shuffle=True)
)
optim_wrapper = dict(optimizer=dict(lr=2.5e-5))
param_scheduler = [
    dict(_base_.param_scheduler[0], start_factor=1e-5 / 2.5e-5),
    _base_.param_scheduler[1],
]
auto_scale_lr = dict(base_batch_size=256)
