"""UperNet on ADE20K on a plain Vim-S: Vim's released segmentation
architecture (see the Vim-T config), lr 1.2e-4 as DyVM's Vim-S release.

Make ``ckpt`` with ``python tools/model_converters/vim2mmssm.py --dense
<official .pth> <ckpt>``.
"""

_base_ = './upernet_vim-t_8xb2-80k_ade20k-512x512.py'

ckpt = 'checkpoints/vim-s_in1k-dense.pth'  # noqa
embed_dims = 384

model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.2,
        init_cfg=dict(checkpoint=ckpt),
    ),
    neck=dict(embed_dim=embed_dims),
    decode_head=dict(in_channels=[embed_dims] * 4),
    auxiliary_head=dict(in_channels=embed_dims),
)
optim_wrapper = dict(optimizer=dict(lr=1.2e-4))
