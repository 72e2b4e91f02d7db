"""UperNet 160k on ADE20K on a PlainMamba-L1, without the ViT-Adapter.

The architecture of the released PlainMamba segmentor
(``plain_mamba_seg_configs/l1_upernet.py`` of ChenhongyiYang/PlainMamba),
which the published mIoU figures come from: the heads read the outputs of
layers 6, 12, 18 and 24, four maps at stride 16 (each normed by its own
LayerNorm, the last by ``ln1``). Pruned tokens keep their features on these
full-grid maps, as in the adapter configs. Everything else (data, schedule,
optimizer, heads) is as in the adapter config this inherits; 8 GPUs x 2
images per step.
"""

_base_ = './upernet_plainmamba-l1_adapter_8xb2-160k_ade20k-512x512.py'

ckpt = 'checkpoints/plainmamba-l1_in1k.pth'  # noqa
norm_cfg = dict(type='SyncBN', requires_grad=True)

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmssm.PlainMamba',
        arch='l1',
        img_size=(512, 512),
        out_indices=(5, 11, 17, 23),
        drop_path_rate=0.1,
        final_norm=True,
        norm_cfg=norm_cfg,
        # dense: no prune_cfg (None by default); the -prune / -naive
        # configs set it
        init_cfg=dict(type='Pretrained', checkpoint=ckpt, prefix='backbone.'),
    ),
)
