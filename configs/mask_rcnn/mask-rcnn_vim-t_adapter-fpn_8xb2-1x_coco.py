"""Mask R-CNN 1x on COCO 2017 with a Vim-T + ViT-Adapter backbone.

The primitive config of the Vim family in this folder (Vim-S and the ``-prune``
/ ``-naive`` configs inherit it). It inherits the PlainMamba-L1 primitive and
replaces its backbone, so everything else is as there: AdamW lr 1e-4, weight
decay 0.05 (none on embeddings, norms, biases and the SSM parameters), 12
epochs with steps at 8 and 11, 1333x800 resize and flip, SyncBN, Shared4Conv1FC
box head. Vim runs without its class token and final norm (as the official Vim
detection and segmentation code). The adapter's drop path is ViT-Adapter's for
DeiT-T.

Results assume 16 images per step: 8 GPUs x 2 images (``8xb2``); with
another setup pass ``--auto-scale-lr`` (``auto_scale_lr.base_batch_size``
is 16).

Make ``ckpt`` with ``python tools/model_converters/vim2mmssm.py --dense
<official .pth> <ckpt>`` (``--dense`` drops the class slot of
``pos_embed``, ``cls_token``, ``norm_f`` and the head). Its keys are
``backbone.*``, hence ``prefix='backbone.'``.
"""

_base_ = './mask-rcnn_plainmamba-l1_adapter-fpn_8xb2-1x_coco.py'

ckpt = 'checkpoints/vim-t_in1k-dense.pth'  # noqa

model = dict(
    backbone=dict(
        backbone=dict(
            _delete_=True,
            type='mmssm.Vim',
            arch='tiny',
            cls_token=None,
            final_norm=False,
            drop_path_rate=0.1,
            # dense: no prune_cfg (None by default); the -prune / -naive
            # configs set it
            init_cfg=dict(
                type='Pretrained', checkpoint=ckpt, prefix='backbone.'
            ),
        ),
    ),
)
