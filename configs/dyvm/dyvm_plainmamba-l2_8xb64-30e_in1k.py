"""DyVM-PlainMamba-L2 (ours): as ``dyvm_plainmamba-l1_8xb64-30e_in1k.py``
with the L2 arch and its steps (``prune_cfg='dyvm'`` schedule)."""

_base_ = './dyvm_plainmamba-l1_8xb64-30e_in1k.py'

ckpt = 'checkpoints/plainmamba-l2_in1k.pth'  # noqa
load_from = ckpt
model = dict(
    backbone=dict(arch='l2'),
    head=dict(in_channels=384),
    teacher=dict(checkpoint=ckpt),
)
