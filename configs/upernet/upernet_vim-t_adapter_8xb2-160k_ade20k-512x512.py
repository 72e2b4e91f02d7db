"""UperNet 160k on ADE20K with a Vim-T + ViT-Adapter backbone.

The primitive config of the Vim family in this folder (Vim-S and the ``-prune``
/ ``-naive`` configs inherit it). It inherits the PlainMamba-L1 adapter
primitive and replaces its backbone, so everything else is as there: the 4
adapter maps (strides 4, 8, 16, 32) to the UperNet head, the auxiliary FCN head
on the stride-32 map, AdamW lr 6e-5, weight decay 0.01 (none on norms,
embeddings and the SSM parameters), linear warm-up for 1500 iterations then
poly (power 1) to 0, 160k iterations, 512x512 crops, SyncBN, single-scale
``whole`` inference, out-of-range labels ignored. Vim runs without its class
token and final norm (as the official Vim detection and segmentation code). The
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

_base_ = './upernet_plainmamba-l1_adapter_8xb2-160k_ade20k-512x512.py'

ckpt = 'checkpoints/vim-t_in1k-dense.pth'  # noqa

model = dict(
    backbone=dict(
        backbone=dict(
            _delete_=True,
            type='mmssm.Vim',
            arch='tiny',
            img_size=_base_.crop_size,
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
)
