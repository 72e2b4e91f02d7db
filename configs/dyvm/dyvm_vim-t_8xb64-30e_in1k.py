"""DyVM-Vim-T (released recipe): cumulative keep 0.9 (0.9, 0.81, 0.729 of
the patch tokens), direction target 0.8, total batch 512 at lr 3e-5; the
rest as ``dyvm_vim-s_8xb32-30e_in1k.py``. 8 GPUs x 64 images.
"""

_base_ = './dyvm_vim-s_8xb32-30e_in1k.py'

ckpt = 'checkpoints/vim-t_in1k.pth'  # noqa
load_from = ckpt
model = dict(
    backbone=dict(arch='tiny'),
    head=dict(in_channels=192),
    teacher=dict(checkpoint=ckpt),
)
train_dataloader = dict(batch_size=64)
optim_wrapper = dict(optimizer=dict(lr=3e-5))
param_scheduler = [
    dict(_base_.param_scheduler[0], start_factor=1e-5 / 3e-5),
    _base_.param_scheduler[1],
]
auto_scale_lr = dict(base_batch_size=512)
