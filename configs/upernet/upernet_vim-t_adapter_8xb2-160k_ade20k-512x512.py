"""UperNet 160k on ADE20K with a Vim-T + ViT-Adapter backbone.

Everything else as in the PlainMamba-L1 config; 8 GPUs x 2 images per step.
Vim runs without its class token and final norm (as the official Vim
detection and segmentation code). Make ``ckpt`` with ``python
tools/model_converters/vim2mmssm.py --dense <official .pth> <ckpt>``
(``--dense`` drops the class slot of ``pos_embed``, ``cls_token``,
``norm_f`` and the head). The adapter's drop path is ViT-Adapter's for
DeiT-T.
"""

_base_ = './upernet_plainmamba-l1_adapter_8xb2-160k_ade20k-512x512.py'

ckpt = 'checkpoints/vim-t_in1k-dense.pth'  # noqa
crop_size = (512, 512)
embed_dims = 192

model = dict(
    backbone=dict(
        backbone=dict(
            _delete_=True,
            type='mmssm.Vim',
            arch='tiny',
            img_size=crop_size,
            cls_token=None,
            final_norm=False,
            drop_path_rate=0.1,
            prune_cfg=None,  # dense; see the -prune / -naive configs
            init_cfg=dict(
                type='Pretrained', checkpoint=ckpt, prefix='backbone.'
            ),
        ),
        deform_num_heads=6,
        interaction_indexes=[[0, 5], [6, 11], [12, 17], [18, 23]],
    ),
    decode_head=dict(in_channels=[embed_dims] * 4),
    auxiliary_head=dict(in_channels=embed_dims),
)
