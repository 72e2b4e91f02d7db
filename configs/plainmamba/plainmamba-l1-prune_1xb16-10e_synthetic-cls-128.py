"""Pruned PlainMamba-L1 classifier on the synthetic classification set.

mmpretrain's ``ImageClassifier``: the backbone's averaged tokens (after
``ln1``, as the released classifier) and a linear head, trained on the CPU
on the project's synthetic set of six glyph classes on clutter (128 x 128,
8 x 8 tokens), with the paper's schedule of L1 (after layers 5 and 10, keep
0.8) and the aligned scan. A small config to show that the classification
path trains and evaluates, not a model-zoo entry.

Make the data first::

    python -c "from mmssm.datasets import write_synthetic_cls; \\
        write_synthetic_cls('data/synthetic/cls-128')"

One process, 16 images per step (``1xb16``).
"""

_base_ = [
    '../_base_/default_runtime_cls.py',
    '../_base_/schedules/adamw_ssm.py',
]
custom_imports = dict(
    imports=['mmssm.models', 'mmssm.engine'], allow_failed_imports=False
)
# Checkpoints record the backbone's pruning schedule in meta['pruning'].
custom_hooks = [dict(type='mmssm.PruningMetaHook')]

data_root = 'data/synthetic/cls-128/'
classes = ('plus', 'cross', 'ring', 'ell', 'tee', 'bars')
num_classes = len(classes)

model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='mmssm.PlainMamba',
        arch='l1',
        img_size=128,
        out_type='avg_featmap',
        prune_cfg='paper',
    ),
    head=dict(
        type='LinearClsHead',
        num_classes=num_classes,
        in_channels=192,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1,),
    ),
)
data_preprocessor = dict(
    num_classes=num_classes,
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    to_rgb=True,
)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
dataset = dict(
    type='CustomDataset', data_root=data_root, metainfo=dict(classes=classes)
)
# No worker processes (a small set, a CPU run); persistent_workers off, which
# mmpretrain's own tools/train.py otherwise turns on (it needs workers).
train_dataloader = dict(
    batch_size=16,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(dataset, ann_file='meta/train.txt', pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True),
)
val_dataloader = dict(
    batch_size=16,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(dataset, ann_file='meta/val.txt', pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False),
)
val_evaluator = dict(type='Accuracy', topk=(1,))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

optim_wrapper = dict(
    _base_.ssm_optim_wrapper,
    optimizer=dict(
        _base_.ssm_optim_wrapper.optimizer, lr=1e-3, weight_decay=0.05
    ),
    paramwise_cfg=dict(
        _base_.ssm_optim_wrapper.paramwise_cfg, bias_decay_mult=0.0
    ),
    clip_grad=dict(max_norm=1.0),
)
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=0.01,
        by_epoch=True,
        end=1,
        convert_to_iter_based=True,
    ),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=1, eta_min=1e-5),
]
train_cfg = dict(by_epoch=True, max_epochs=10, val_interval=1)
val_cfg = dict()
test_cfg = dict()
auto_scale_lr = dict(base_batch_size=16)
default_hooks = dict(logger=dict(interval=10))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
