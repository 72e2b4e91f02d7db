"""UperNet 160k on ADE20K with a PlainMamba-L3 + ViT-Adapter backbone.

Everything else as in the L1 config; 8 GPUs x 2 images per step. Make
``ckpt`` with ``python tools/model_converters/plainmamba2mmssm.py
l3.pth <ckpt>``.
"""

_base_ = './upernet_plainmamba-l1_adapter_8xb2-160k_ade20k-512x512.py'

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
    decode_head=dict(in_channels=[embed_dims] * 4),
    auxiliary_head=dict(in_channels=embed_dims),
)
