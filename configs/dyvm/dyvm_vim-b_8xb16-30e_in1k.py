"""DyVM-Vim-B (released recipe): cumulative keep 0.7, direction target
0.7, total batch 128 at lr 5e-5 x 128 / 512; the rest as
``dyvm_vim-s_8xb32-30e_in1k.py``. 8 GPUs x 16 images.

Paper: 79.9% top-1, 101 M params.
"""

_base_ = './dyvm_vim-s_8xb32-30e_in1k.py'

ckpt = 'checkpoints/vim-b_in1k.pth'  # noqa
load_from = ckpt
model = dict(
    backbone=dict(arch='base'),
    head=dict(in_channels=768),
    direction_ratio_loss=dict(target=0.7),
    teacher=dict(checkpoint=ckpt),
)
train_dataloader = dict(batch_size=16)
optim_wrapper = dict(optimizer=dict(lr=1.25e-5))
param_scheduler = [
    dict(_base_.param_scheduler[0], start_factor=1e-5 / 1.25e-5),
    _base_.param_scheduler[1],
]
auto_scale_lr = dict(base_batch_size=128)
