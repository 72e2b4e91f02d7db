"""A smoke-test run of the L1-prune detector on 4 COCO images (CPU-sized).

``data/coco_persons_mini``: 4 COCO val2017 images with their 14 person
masks (see its SOURCE.txt). The model trains on them and is validated on
the same images: it checks that training, checkpointing and COCO
evaluation run end to end, not the accuracy of the method. Changes to
the L1-prune config: 1 class, images resized to fit 320x320, BN instead
of SyncBN (one process), no pretrained weights, 4 epochs of 2 iterations
(1 GPU or CPU x 2 images) with a matching short schedule, and no score
threshold at test time (so that there is always something to evaluate).

    python tools/train.py <this config>
    python tools/test.py <this config> work_dirs/<this config>/epoch_4.pth
"""

_base_ = './mask-rcnn_plainmamba-l1-prune_adapter-fpn_8xb2-1x_coco.py'

data_root = 'data/coco_persons_mini/'
ann_file = 'annotations/test_coco.json'
metainfo = dict(classes=('person',))
img_scale = (320, 320)
norm_cfg = dict(type='BN', requires_grad=True)

model = dict(
    backbone=dict(
        backbone=dict(norm_cfg=norm_cfg, init_cfg=None),
        norm_cfg=norm_cfg,
    ),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(num_classes=1, norm_cfg=norm_cfg),
        mask_head=dict(num_classes=1),
    ),
    # keep every detection: a barely trained model scores below mmdet's
    # 0.05, and the COCO evaluation would have nothing to evaluate
    test_cfg=dict(rcnn=dict(score_thr=0.0)),
)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=(
            'img_id',
            'img_path',
            'ori_shape',
            'img_shape',
            'scale_factor',
        ),
    ),
]
dataset = dict(
    type='CocoDataset',
    data_root=data_root,
    ann_file=ann_file,
    data_prefix=dict(img='val2017/'),
    metainfo=metainfo,
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
    dataset=dict(dataset, test_mode=True, pipeline=test_pipeline),
)
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + ann_file)
test_evaluator = val_evaluator

max_epochs = 4
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=4),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[3],
        gamma=0.1,
    ),
]
default_hooks = dict(
    logger=dict(interval=1),
    checkpoint=dict(interval=1, max_keep_ckpts=2),
)
log_processor = dict(window_size=1)
auto_scale_lr = dict(enable=False, base_batch_size=2)
