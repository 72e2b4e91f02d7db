"""Mask R-CNN 1x on COCO 2017 with a PlainMamba-L3 + ViT-Adapter backbone.

Everything else as in the L1 config; 8 GPUs x 2 images per step. Make
``ckpt`` with ``python tools/model_converters/plainmamba2mmssm.py
l3.pth <ckpt>``.
"""

_base_ = './mask-rcnn_plainmamba-l1_adapter-fpn_8xb2-1x_coco.py'

ckpt = 'checkpoints/plainmamba-l3_in1k.pth'  # noqa
embed_dims = 448

model = dict(
    backbone=dict(
        backbone=dict(
            arch='l3',
            drop_path_rate=0.3,
            init_cfg=dict(checkpoint=ckpt),
        ),
        deform_num_heads=8,
        interaction_indexes=[[0, 8], [9, 17], [18, 26], [27, 35]],
    ),
    neck=dict(in_channels=[embed_dims] * 4),
)
