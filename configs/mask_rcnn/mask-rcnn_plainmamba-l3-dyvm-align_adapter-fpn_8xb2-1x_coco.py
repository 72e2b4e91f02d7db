"""The dense config with DyVM's learned token pruning and direction
selection (``configs/_base_/models/dyvm_dense.py``), trained in
place with the aligned scan (``align=True``, ours: no release).
"""

_base_ = [
    './mask-rcnn_plainmamba-l3_adapter-fpn_8xb2-1x_coco.py',
    '../_base_/models/dyvm_dense.py',
]

model = dict(
    backbone=dict(
        backbone=dict(
            prune_cfg=dict(
                _base_.dyvm_prune_cfg, layers=(9, 18, 27), align=True
            ),
            direction_gate=True,
        )
    )
)
