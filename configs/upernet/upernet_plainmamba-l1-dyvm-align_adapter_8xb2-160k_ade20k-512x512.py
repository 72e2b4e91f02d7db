"""The dense config with DyVM's learned token pruning and direction
selection (``configs/_base_/models/dyvm_dense.py``), trained in
place with the aligned scan (``align=True``, ours: no release).
"""

_base_ = [
    './upernet_plainmamba-l1_adapter_8xb2-160k_ade20k-512x512.py',
    '../_base_/models/dyvm_dense.py',
]

model = dict(
    backbone=dict(
        backbone=dict(
            prune_cfg=dict(_base_.dyvm_prune_cfg, align=True),
            direction_gate=True,
        )
    )
)
