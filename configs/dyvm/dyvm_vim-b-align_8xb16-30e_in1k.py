"""DyVM-Vim-B-align (ours): ``dyvm_vim-b_8xb16-30e_in1k.py`` with the
learned pruner trained in place and run with the alignment scan
(``align=True``, ``gap_mode='null'``)."""

_base_ = './dyvm_vim-s_8xb32-30e_in1k.py'

# the arch's settings of
# ``dyvm_vim-b_8xb16-30e_in1k.py``
# (restated: inheriting it would nest the bases deeper than 3 levels)
ckpt = 'checkpoints/vim-b_in1k.pth'  # noqa
load_from = ckpt
model = dict(
    backbone=dict(prune_cfg=dict(align=True), arch='base'),
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
