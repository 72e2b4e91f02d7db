"""Mask R-CNN 1x on COCO 2017 with a Vim-S + ViT-Adapter backbone.

Everything else as in the Vim-T config; 8 GPUs x 2 images per step. Make
``ckpt`` with ``python tools/model_converters/vim2mmssm.py --dense
<official .pth> <ckpt>``. The adapter's drop path is ViT-Adapter's for
DeiT-S.
"""

_base_ = './mask-rcnn_vim-t_adapter-fpn_8xb2-1x_coco.py'

ckpt = 'checkpoints/vim-s_in1k-dense.pth'  # noqa
embed_dims = 384

model = dict(
    backbone=dict(
        backbone=dict(
            arch='small',
            drop_path_rate=0.2,
            init_cfg=dict(checkpoint=ckpt),
        ),
    ),
    neck=dict(in_channels=[embed_dims] * 4),
)
