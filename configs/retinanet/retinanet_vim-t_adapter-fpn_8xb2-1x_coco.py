"""RetinaNet 1x on COCO 2017 with a Vim-T + ViT-Adapter backbone.

The primitive config of the Vim family in this folder (Vim-S and the
``-prune`` / ``-naive`` configs inherit it); everything but the backbone is
as in the PlainMamba-L1 primitive: AdamW lr 1e-4, weight decay 0.05 (none
on embeddings, norms, biases and the SSM parameters), gradient clipping at
35, 12 epochs with steps at 8 and 11, 1333x800 resize and flip, SyncBN in
the adapter. Vim runs without its class token and final norm (as the
official Vim detection and segmentation code). The adapter's drop path is
ViT-Adapter's for DeiT-T.

Results assume 16 images per step: 8 GPUs x 2 images (``8xb2``); with
another setup pass ``--auto-scale-lr`` (``auto_scale_lr.base_batch_size``
is 16).

Make ``ckpt`` with ``python tools/model_converters/vim2mmssm.py --dense
<official .pth> <ckpt>`` (``--dense`` drops the class slot of
``pos_embed``, ``cls_token``, ``norm_f`` and the head). Its keys are
``backbone.*``, hence ``prefix='backbone.'``.
"""

_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
    '../_base_/default_runtime_det.py',
    '../_base_/models/ssm_vit_adapter.py',
    '../_base_/schedules/adamw_ssm.py',
]
custom_imports = dict(
    imports=['mmssm.models', 'mmssm.engine'], allow_failed_imports=False
)
# Checkpoints record the backbone's pruning schedule in meta['pruning'].
custom_hooks = [dict(type='mmssm.PruningMetaHook')]

ckpt = 'checkpoints/vim-t_in1k-dense.pth'  # noqa
norm_cfg = dict(type='SyncBN', requires_grad=True)
embed_dims = 192

model = dict(
    backbone=dict(
        _base_.vit_adapter,
        _delete_=True,
        backbone=dict(
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
    # 4 adapter maps of embed_dims channels at strides 4..32; the stride-4
    # map is not used (start_level=1) -> 5 levels at strides 8..128
    neck=dict(
        in_channels=[embed_dims] * 4,
        out_channels=256,
        start_level=1,
        add_extra_convs='on_output',
        num_outs=5,
    ),
)
# The adapter's stride-4 output norm (ad_norm1) gets no gradient when the
# FPN starts at level 1, so DDP must look for unused parameters (as the
# released RetinaNet config does).
find_unused_parameters = True

train_dataloader = dict(batch_size=2)  # x 8 GPUs = 16 images per step

optim_wrapper = dict(
    _base_.ssm_optim_wrapper,
    _delete_=True,  # replaces schedule_1x's SGD
    optimizer=dict(
        _base_.ssm_optim_wrapper.optimizer, lr=1e-4, weight_decay=0.05
    ),
    paramwise_cfg=dict(
        _base_.ssm_optim_wrapper.paramwise_cfg, bias_decay_mult=0.0
    ),
    clip_grad=dict(max_norm=35, norm_type=2),
)
# schedule_1x: 12 epochs, linear warm-up (500 iterations), steps at 8 and 11
auto_scale_lr = dict(enable=False, base_batch_size=16)
