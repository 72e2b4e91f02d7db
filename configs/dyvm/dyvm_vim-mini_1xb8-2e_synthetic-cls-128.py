"""DyVM on a small Vim on the synthetic classification set, for the CPU.

The DyVM-Vim-S recipe's model and losses (learned token pruning with its
predictor, direction gates, token- and direction-ratio losses, KL and
token distillation from the frozen dense teacher) on an 8-layer, 64-channel
Vim at 128 x 128 (64 patch tokens; steps after layers 2, 4, 6 keep 0.7,
0.49, 0.343 of them), trained from scratch on the project's synthetic set
of six glyph classes. No dense checkpoint exists for it: the teacher is
the student's initial weights (``teacher=dict(checkpoint=None)``). A
config to show that DyVM trains and evaluates end to end, not a model-zoo
entry.

Make the data first::

    python -c "from mmssm.datasets import write_synthetic_cls; \\
        write_synthetic_cls('data/synthetic/cls-128')"

One process, 8 images per step (``1xb8``).
"""

_base_ = './dyvm_vim-s_8xb32-30e_in1k.py'

data_root = 'data/synthetic/cls-128/'
classes = ('plus', 'cross', 'ring', 'ell', 'tee', 'bars')

load_from = None
model = dict(
    backbone=dict(
        arch=dict(
            _delete_=True,
            embed_dims=64,
            num_layers=8,
            patch_size=16,
            stride=16,
            d_state=8,
            expand=2,
            d_conv=4,
            cls_token='middle',
        ),
        img_size=128,
        prune_cfg=dict(
            _delete_=True,
            type='mmssm.LearnedTokenPruner',
            layers=(2, 4, 6),
            keep_ratios=0.7,
        ),
    ),
    head=dict(num_classes=len(classes), in_channels=64, topk=(1,)),
    teacher=dict(checkpoint=None),
)
data_preprocessor = dict(num_classes=len(classes))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
dataset = dict(
    type='CustomDataset', data_root=data_root, metainfo=dict(classes=classes)
)
train_dataloader = dict(
    _delete_=True,
    batch_size=8,
    num_workers=0,
    dataset=dict(dataset, ann_file='meta/train.txt', pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True),
)
val_dataloader = dict(
    _delete_=True,
    batch_size=8,
    num_workers=0,
    dataset=dict(dataset, ann_file='meta/val.txt', pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False),
)
val_evaluator = dict(type='Accuracy', topk=(1,))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

# from scratch: a larger lr, one warm-up epoch
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(_base_.param_scheduler[0], start_factor=0.01, end=1),
    dict(_base_.param_scheduler[1], begin=1, end=2, eta_min=1e-5),
]
train_cfg = dict(max_epochs=2)
auto_scale_lr = dict(base_batch_size=8)
default_hooks = dict(logger=dict(interval=1))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
