"""DyVM-PlainMamba-L1-align (ours):
``dyvm_plainmamba-l1_8xb64-30e_in1k.py`` with the learned pruner trained
in place as the alignment scan with ``gap_mode='null'``
(``align=True``), which inference runs."""

_base_ = './dyvm_plainmamba-l1_8xb64-30e_in1k.py'

model = dict(backbone=dict(prune_cfg=dict(align=True)))
