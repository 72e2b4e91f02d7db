"""A smoke-test run of the L1-prune segmentor on 3 ADE20K images (CPU-sized).

``data/ade20k_mini``: 3 ADE20K validation images with their official
label maps (see its SOURCE.txt). The model trains on them and is validated
on the same images with mmseg's ``IoUMetric``: it checks that training,
checkpointing and evaluation run end to end, not the accuracy of the
method. Changes to the L1-prune config: images resized to a short side of
256 and 256x256 crops, BN instead of SyncBN (one process), no pretrained
weights, 8 iterations of 2 images (1 GPU or CPU x 2) with a matching short
schedule, validation and a checkpoint at the end.

    python tools/train.py <this config>
    python tools/test.py <this config> work_dirs/<this config>/iter_8.pth
"""

_base_ = './upernet_plainmamba-l1-prune_adapter_8xb2-160k_ade20k-512x512.py'

data_root = 'data/ade20k_mini/'
num_classes = 150
crop_size = (256, 256)
img_scale = (1024, 256)
norm_cfg = dict(type='BN', requires_grad=True)

data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        backbone=dict(img_size=crop_size, norm_cfg=norm_cfg, init_cfg=None),
        norm_cfg=norm_cfg,
    ),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg),
)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='mmssm.IgnoreOutOfRangeLabels', num_classes=num_classes),
    dict(
        type='RandomResize',
        scale=img_scale,
        ratio_range=(0.5, 2.0),
        keep_ratio=True,
    ),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='mmssm.IgnoreOutOfRangeLabels', num_classes=num_classes),
    dict(type='PackSegInputs'),
]
dataset = dict(
    type='ADE20KDataset',
    data_root=data_root,
    data_prefix=dict(
        img_path='images/validation', seg_map_path='annotations/validation'
    ),
)
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(dataset, pipeline=train_pipeline),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(dataset, pipeline=test_pipeline),
)
test_dataloader = val_dataloader

max_iters = 8
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2),
    dict(
        type='PolyLR',
        eta_min=0.0,
        power=1.0,
        begin=2,
        end=max_iters,
        by_epoch=False,
    ),
]
default_hooks = dict(
    logger=dict(interval=1),
    checkpoint=dict(interval=max_iters // 2, max_keep_ckpts=2),
)
log_processor = dict(window_size=1)
auto_scale_lr = dict(enable=False, base_batch_size=2)
