"""UperNet 160k on ADE20K with a Vim-T + ViT-Adapter backbone.

The primitive config of the Vim family in this folder (Vim-S and the
``-prune`` / ``-naive`` configs inherit it); everything but the backbone is
as in the PlainMamba-L1 adapter primitive: the 4 adapter maps (strides 4,
8, 16, 32) to the UperNet head, the auxiliary FCN head on the stride-32
map, AdamW lr 6e-5, weight decay 0.01 (none on norms, embeddings and the
SSM parameters), linear warm-up for 1500 iterations then poly (power 1) to
0, 160k iterations, 512x512 crops, SyncBN, single-scale ``whole``
inference, out-of-range labels ignored. Vim runs without its class token
and final norm (as the official Vim detection and segmentation code). The
adapter's drop path is ViT-Adapter's for DeiT-T.

Results assume 16 images per step: 8 GPUs x 2 images (``8xb2``); with
another setup pass ``--auto-scale-lr`` (``auto_scale_lr.base_batch_size``
is 16).

Make ``ckpt`` with ``python tools/model_converters/vim2mmssm.py --dense
<official .pth> <ckpt>`` (``--dense`` drops the class slot of
``pos_embed``, ``cls_token``, ``norm_f`` and the head). Its keys are
``backbone.*``, hence ``prefix='backbone.'``; its 224x224 ``pos_embed`` is
resized to the 512x512 grid when it is loaded.
"""

_base_ = [
    'mmseg::_base_/models/upernet_r50.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/schedules/schedule_160k.py',
    'mmseg::_base_/default_runtime.py',
    '../_base_/default_runtime_seg.py',
    '../_base_/models/ssm_vit_adapter.py',
    '../_base_/schedules/adamw_ssm.py',
]
custom_imports = dict(
    imports=['mmssm.models', 'mmssm.engine', 'mmssm.datasets.transforms'],
    allow_failed_imports=False,
)

ckpt = 'checkpoints/vim-t_in1k-dense.pth'  # noqa
norm_cfg = dict(type='SyncBN', requires_grad=True)
embed_dims = 192
num_classes = 150
crop_size = (512, 512)

data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        _base_.vit_adapter,
        _delete_=True,
        backbone=dict(
            type='mmssm.Vim',
            arch='tiny',
            img_size=crop_size,
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
    # 4 adapter maps of embed_dims channels at strides 4, 8, 16, 32
    decode_head=dict(
        in_channels=[embed_dims] * 4,
        in_index=[0, 1, 2, 3],
        channels=512,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
    ),
    auxiliary_head=dict(
        in_channels=embed_dims,
        in_index=3,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
    ),
    test_cfg=dict(mode='whole'),
)

# the base pipelines with IgnoreOutOfRangeLabels after LoadAnnotations
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='mmssm.IgnoreOutOfRangeLabels', num_classes=num_classes),
    dict(
        type='RandomResize',
        scale=(2048, 512),
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
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    # the labels are loaded after Resize: evaluated at the original size
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='mmssm.IgnoreOutOfRangeLabels', num_classes=num_classes),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=2,  # x 8 GPUs = 16 images per step
    dataset=dict(pipeline=train_pipeline),
)
val_dataloader = dict(batch_size=1, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(
    _base_.ssm_optim_wrapper,
    _delete_=True,  # replaces schedule_160k's SGD
    optimizer=dict(
        _base_.ssm_optim_wrapper.optimizer, lr=6e-5, weight_decay=0.01
    ),
)
# linear warm-up for 1500 iterations, then poly (power 1) to 0 at 160k
param_scheduler = [
    dict(
        type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500
    ),
    dict(
        type='PolyLR',
        eta_min=0.0,
        power=1.0,
        begin=1500,
        end=160000,
        by_epoch=False,
    ),
]
# schedule_160k: 160k iterations, validation and checkpoints every 16k
auto_scale_lr = dict(enable=False, base_batch_size=16)
# Checkpoints record the backbone's pruning schedule in meta['pruning'].
custom_hooks = [dict(type='mmssm.PruningMetaHook')]
