"""UperNet on ADE20K on a plain Vim-T: Vim's released segmentation
architecture, without the ViT-Adapter.

Vim (hustvl/Vim) segments with UperNet on the plain backbone: the outputs
of layers 6, 12, 18 and 24 (``out_indices`` 5, 11, 17, 23; no class
token), four stride-16 maps made into a pyramid by mmseg's
``Feature2Pyramid`` (two transposed convolutions to stride 4, one to
stride 8, identity at 16, max-pool to 32), then the UperNet head and the
auxiliary FCN head on the stride-32 map. Vim's published ADE20K mIoU (Vim-T
41.0, Vim-S 44.9; Vim's figures, not measured here) belong to this
architecture.

Schedule: the one DyVM released with its Vim segmentation code (built on
Vim's): AdamW lr 6e-5 (Vim-S 1.2e-4), weight decay 0.01 (none on norms and
the SSM parameters), linear warm-up for 1500 iterations then poly (power
1) to 0, gradient clipping at 5, 80k iterations (DyVM's "160k" schedule
file sets 80k). Data, heads and inference as in the adapter config this
inherits; 8 GPUs x 2 images per step.

Make ``ckpt`` with ``python tools/model_converters/vim2mmssm.py --dense
<official .pth> <ckpt>``.
"""

_base_ = './upernet_vim-t_adapter_8xb2-160k_ade20k-512x512.py'

ckpt = 'checkpoints/vim-t_in1k-dense.pth'  # noqa
norm_cfg = dict(type='SyncBN', requires_grad=True)
embed_dims = 192
max_iters = 80000

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmssm.Vim',
        arch='tiny',
        img_size=(512, 512),
        cls_token=None,
        out_indices=(5, 11, 17, 23),
        final_norm=False,
        drop_path_rate=0.1,
        # dense: no prune_cfg (None by default); the -dyvm configs set it
        init_cfg=dict(type='Pretrained', checkpoint=ckpt, prefix='backbone.'),
    ),
    # strides 16 -> 4, 8, 16, 32
    neck=dict(
        type='Feature2Pyramid',
        embed_dim=embed_dims,
        rescales=[4, 2, 1, 0.5],
        norm_cfg=norm_cfg,
    ),
)

optim_wrapper = dict(clip_grad=dict(max_norm=5.0, norm_type=2))
param_scheduler = [
    dict(
        type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500
    ),
    dict(
        type='PolyLR',
        eta_min=0.0,
        power=1.0,
        begin=1500,
        end=max_iters,
        by_epoch=False,
    ),
]
train_cfg = dict(max_iters=max_iters, val_interval=8000)
default_hooks = dict(checkpoint=dict(interval=8000))
