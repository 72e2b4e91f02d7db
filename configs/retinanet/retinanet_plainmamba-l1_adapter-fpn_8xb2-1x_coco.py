"""RetinaNet 1x on COCO 2017 with a PlainMamba-L1 + ViT-Adapter backbone.

The primitive config of this folder: every other RetinaNet config inherits
it and changes the backbone (or only its ``prune_cfg``). The settings are
those of the released PlainMamba detector: AdamW lr 1e-4, weight decay 0.05
(none on embeddings, norms, biases and the SSM parameters), gradient
clipping at 35, 12 epochs with steps at 8 and 11, 1333x800 resize and flip,
SyncBN in the adapter.

Results assume 16 images per step: 8 GPUs x 2 images (``8xb2``); with
another setup pass ``--auto-scale-lr`` (``auto_scale_lr.base_batch_size``
is 16).

``ckpt`` is the converted ImageNet checkpoint; make it with
``python tools/model_converters/plainmamba2mmssm.py l1.pth <ckpt>``
(the official ``l1.pth`` of ChenhongyiYang/PlainMamba). Its keys are
``backbone.*``, hence ``prefix='backbone.'``.
"""

_base_ = [
    '../_base_/models/retinanet_r50_fpn.py',
    '../_base_/datasets/coco_detection.py',
    '../_base_/schedules/schedule_1x.py',
    '../_base_/default_runtime_det.py',
]
custom_imports = dict(
    imports=['mmssm.models', 'mmssm.engine'], allow_failed_imports=False
)
# Checkpoints record the backbone's pruning schedule in meta['pruning'].
custom_hooks = [dict(type='mmssm.PruningMetaHook')]

ckpt = 'checkpoints/plainmamba-l1_in1k.pth'  # noqa
norm_cfg = dict(type='SyncBN', requires_grad=True)
embed_dims = 192

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmssm.ViTAdapter',
        backbone=dict(
            type='mmssm.PlainMamba',
            arch='l1',
            drop_path_rate=0.1,
            final_norm=False,
            norm_cfg=norm_cfg,
            prune_cfg=None,  # dense; see the -prune / -naive configs
            init_cfg=dict(
                type='Pretrained', checkpoint=ckpt, prefix='backbone.'
            ),
        ),
        conv_inplane=64,
        n_points=4,
        deform_num_heads=6,
        cffn_ratio=0.25,
        deform_ratio=1.0,
        init_values=0.0,
        interaction_indexes=[[0, 5], [6, 11], [12, 17], [18, 23]],
        add_vit_feature=True,
        norm_cfg=norm_cfg,
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
    _delete_=True,
    type='OptimWrapper',
    # honours the backbones' `_no_weight_decay` flags (A_log, D, ...) and
    # matches no_decay_names exactly (substring custom_keys would not)
    constructor='mmssm.SSMOptimWrapperConstructor',
    optimizer=dict(
        type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05
    ),
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        no_decay_names=(
            'pos_embed',
            'level_embed',
            'cls_token',
            'A_log',
            'A_b_log',
            'D',
            'D_b',
            'direction_Bs',
        ),
    ),
    clip_grad=dict(max_norm=35, norm_type=2),
)
# schedule_1x: 12 epochs, linear warm-up (500 iterations), steps at 8 and 11
auto_scale_lr = dict(enable=False, base_batch_size=16)
