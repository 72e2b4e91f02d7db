"""UperNet 160k on ADE20K on a PlainMamba-L3, without the ViT-Adapter.

The released segmentor's architecture: the heads read the outputs of
layers 9, 18, 27 and 36, four maps at stride 16. Everything else as in the
L1 config of this kind; 8 GPUs x 2 images per step. Make ``ckpt`` with
``python tools/model_converters/plainmamba2mmssm.py l3.pth <ckpt>``.
"""

_base_ = './upernet_plainmamba-l1_adapter_8xb2-160k_ade20k-512x512.py'

ckpt = 'checkpoints/plainmamba-l3_in1k.pth'  # noqa
norm_cfg = dict(type='SyncBN', requires_grad=True)
embed_dims = 448

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmssm.PlainMamba',
        arch='l3',
        img_size=(512, 512),
        out_indices=(8, 17, 26, 35),
        drop_path_rate=0.3,
        final_norm=True,
        norm_cfg=norm_cfg,
        # dense: no prune_cfg (None by default); the -prune / -naive
        # configs set it
        init_cfg=dict(type='Pretrained', checkpoint=ckpt, prefix='backbone.'),
    ),
    decode_head=dict(in_channels=[embed_dims] * 4),
    auxiliary_head=dict(in_channels=embed_dims),
)
