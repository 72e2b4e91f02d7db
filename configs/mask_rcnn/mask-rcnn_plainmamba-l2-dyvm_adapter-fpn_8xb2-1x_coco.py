"""The dense config with DyVM's learned token pruning and direction
selection (``configs/_base_/models/dyvm_dense.py``), DyVM's
rearrangement (``align=False``).
"""

_base_ = [
    './mask-rcnn_plainmamba-l2_adapter-fpn_8xb2-1x_coco.py',
    '../_base_/models/dyvm_dense.py',
]

model = dict(
    backbone=dict(
        backbone=dict(
            prune_cfg=dict(_base_.dyvm_prune_cfg),
            direction_gate=True,
        )
    )
)
