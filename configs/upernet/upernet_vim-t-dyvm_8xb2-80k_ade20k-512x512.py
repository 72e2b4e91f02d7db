"""The dense config with DyVM's learned token pruning and direction
selection (``configs/_base_/models/dyvm_dense.py``), DyVM's
rearrangement (``align=False``).
"""

_base_ = [
    './upernet_vim-t_8xb2-80k_ade20k-512x512.py',
    '../_base_/models/dyvm_dense.py',
]

model = dict(
    backbone=dict(
        prune_cfg=dict(_base_.dyvm_prune_cfg, keep_ratios=0.9),
        direction_gate=True,
    )
)
