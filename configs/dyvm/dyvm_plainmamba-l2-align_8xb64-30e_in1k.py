"""DyVM-PlainMamba-L2-align (ours):
``dyvm_plainmamba-l2_8xb64-30e_in1k.py`` with the learned pruner trained
in place as the alignment scan with ``gap_mode='null'``
(``align=True``), which inference runs."""

_base_ = './dyvm_plainmamba-l1_8xb64-30e_in1k.py'

# the arch's settings of
# ``dyvm_plainmamba-l2_8xb64-30e_in1k.py``
# (restated: inheriting it would nest the bases deeper than 3 levels)
ckpt = 'checkpoints/plainmamba-l2_in1k.pth'  # noqa
load_from = ckpt
model = dict(
    backbone=dict(prune_cfg=dict(align=True), arch='l2'),
    head=dict(in_channels=384),
    teacher=dict(checkpoint=ckpt),
)
