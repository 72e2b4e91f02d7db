"""UperNet 160k on ADE20K with a PlainMamba-L2 + ViT-Adapter backbone.

Everything else as in the L1 config; 8 GPUs x 2 images per step. Make
``ckpt`` with ``python tools/model_converters/plainmamba2mmssm.py
l2.pth <ckpt>``.
"""

_base_ = './upernet_plainmamba-l1_adapter_8xb2-160k_ade20k-512x512.py'

ckpt = 'checkpoints/plainmamba-l2_in1k.pth'  # noqa
embed_dims = 384

model = dict(
    backbone=dict(
        backbone=dict(
            arch='l2',
            drop_path_rate=0.2,
            init_cfg=dict(checkpoint=ckpt),
        ),
        deform_num_heads=6,
        interaction_indexes=[[0, 5], [6, 11], [12, 17], [18, 23]],
    ),
    decode_head=dict(in_channels=[embed_dims] * 4),
    auxiliary_head=dict(in_channels=embed_dims),
)
