"""Mask R-CNN with a dense PlainMamba-L1 + ViT-Adapter, trained on the
synthetic shapes set on a CPU (a few minutes; not a zoo entry).

The settings of the CPU runs on the synthetic COCO-format set of
``mmssm.datasets.synthetic_coco`` (circles, squares and triangles on a
textured background, 128x128); the pruned variants inherit it and set only
the backbone's ``prune_cfg``: ``-prune`` (the paper's schedule, aligned;
the main job's config, ``tools/main_job.sh``) and ``-dyvm`` (DyVM's
learned pruning). Make the set and train::

    python tools/misc/make_synthetic_coco.py data/synthetic/shapes-128 \\
        --num-train 400 --num-val 50 --size 128 --seed 0
    python tools/train.py <a config>
    python tools/test.py <a config> work_dirs/<config>/iter_300.pth

It shows that the whole pipeline learns, not the accuracy of the method.
Changes to ``mask-rcnn_plainmamba-l1_adapter-fpn_8xb2-1x_coco.py``:

* no ImageNet initialisation: the converted PlainMamba checkpoint is not
  available offline, so the backbone starts from random weights;
* the adapter's ``prior_gamma_init=0``: its outputs start as the spatial
  prior module's maps, and what the interactions and the backbone add is
  mixed in by learnable per-channel scales from 0. With the released
  adapter (None), the additions of a random backbone swamp the prior and
  this detector does not learn within the budget (box AP 0.00 after 300
  iterations; 0.18 after 100 with the scales);
* 3 classes; images 128x128 (no resize), flip; BN instead of SyncBN (one
  process); drop path 0 (a short run from scratch);
* fewer RPN proposals and sampled RoIs (a few objects per image);
* 1 process (CPU or 1 GPU) x 4 images, AdamW lr 1e-3 (from scratch) with
  a linear warm-up and gradient clipping at 5, iteration-based (300
  iterations, 3 passes over the 400 training images), lr x0.1 for the last
  50; validation (COCO bbox + segm) once, at the end, on the 50 validation
  images.
"""

_base_ = './mask-rcnn_plainmamba-l1_adapter-fpn_8xb2-1x_coco.py'

data_root = 'data/synthetic/shapes-128/'
metainfo = dict(
    classes=('circle', 'square', 'triangle'),
    palette=[(220, 20, 60), (0, 130, 255), (255, 190, 0)],
)
num_classes = len(metainfo['classes'])
img_scale = (128, 128)
norm_cfg = dict(type='BN', requires_grad=True)
head_channels = 128  # 256 in the COCO config

model = dict(
    backbone=dict(
        backbone=dict(
            drop_path_rate=0.0,
            norm_cfg=norm_cfg,
            # no pretrained weights (no checkpoint offline): from scratch
            init_cfg=None,
        ),
        norm_cfg=norm_cfg,
        # start from the spatial prior; see the docstring
        prior_gamma_init=0.0,
    ),
    neck=dict(out_channels=head_channels, norm_cfg=norm_cfg),
    rpn_head=dict(in_channels=head_channels, feat_channels=head_channels),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=head_channels),
        bbox_head=dict(
            in_channels=head_channels,
            conv_out_channels=head_channels,
            num_classes=num_classes,
            norm_cfg=norm_cfg,
        ),
        mask_roi_extractor=dict(out_channels=head_channels),
        mask_head=dict(
            in_channels=head_channels,
            conv_out_channels=head_channels,
            num_classes=num_classes,
        ),
    ),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=200),
        rcnn=dict(sampler=dict(num=32)),
    ),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=100)),
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
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(
        _delete_=True,
        type='CocoDataset',
        data_root=data_root,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        metainfo=metainfo,
        filter_cfg=dict(filter_empty_gt=True, min_size=8),
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        _delete_=True,
        type='CocoDataset',
        data_root=data_root,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        metainfo=metainfo,
        test_mode=True,
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(
    ann_file=data_root + 'annotations/instances_val.json',
    metric=['bbox', 'segm'],
)
test_evaluator = val_evaluator

max_iters = 300
train_cfg = dict(
    _delete_=True,
    type='IterBasedTrainLoop',
    max_iters=max_iters,
    val_interval=max_iters,
)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_iters,
        by_epoch=False,
        milestones=[250],
        gamma=0.1,
    ),
]
optim_wrapper = dict(optimizer=dict(lr=1e-3), clip_grad=dict(max_norm=5.0))
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(by_epoch=False, interval=100, max_keep_ckpts=2),
)
log_processor = dict(by_epoch=False, window_size=10)
auto_scale_lr = dict(enable=False, base_batch_size=4)
