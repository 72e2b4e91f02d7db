"""DyVM-PlainMamba-L3 (ours): as ``dyvm_plainmamba-l1_8xb64-30e_in1k.py``
with the L3 arch and its steps (``prune_cfg='dyvm'`` schedule)."""

_base_ = './dyvm_plainmamba-l1_8xb64-30e_in1k.py'

ckpt = 'checkpoints/plainmamba-l3_in1k.pth'  # noqa
load_from = ckpt
model = dict(
    backbone=dict(arch='l3'),
    head=dict(in_channels=448),
    teacher=dict(checkpoint=ckpt),
)
