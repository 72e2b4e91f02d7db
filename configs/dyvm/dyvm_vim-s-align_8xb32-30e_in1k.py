"""DyVM-Vim-S-align (ours): DyVM's learned pruner trained in place with
the alignment scan.

As ``dyvm_vim-s_8xb32-30e_in1k.py`` except ``align=True``: no
rearrangement; the pruned tokens are masked where they are (a masked token
is a zero-input step), which equals the alignment scan with
``gap_mode='null'`` that inference runs on the kept tokens at their
original positions; the class token stays at its place. No released model
or figure: this combination is new.
"""

_base_ = './dyvm_vim-s_8xb32-30e_in1k.py'

model = dict(backbone=dict(prune_cfg=dict(align=True)))
