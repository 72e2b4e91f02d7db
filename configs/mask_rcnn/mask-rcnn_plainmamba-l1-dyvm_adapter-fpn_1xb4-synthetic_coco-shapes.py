"""DyVM's learned token pruning in the detector trained on synthetic shapes
on a CPU (issue 13's "shown working" run; not a zoo entry).

The CPU settings of ``mask-rcnn_plainmamba-l1_adapter-fpn_1xb4-synthetic_
coco-shapes.py`` (random weights, 128x128 shapes, 300 iterations of 4
images) with the learned pruner of the ``-dyvm`` COCO configs
(``configs/_base_/models/dyvm_dense.py``: a predictor after layers 6, 12
and 18 of PlainMamba-L1's 24, cumulative keep 0.8, 0.64, 0.512, DyVM's
rearrangement) and a direction gate in every layer. The token-ratio and
direction-ratio losses (weights 20, direction target 0.8) reach the loss
dict through ``mmssm.DyVMAuxLossHook``, which logs ``token_keep`` (the
kept fraction after the last step, target 0.512) and ``direction_keep``.
The run, its ratio curve and AP: ``configs/mask_rcnn/README.md``.
"""

_base_ = [
    './mask-rcnn_plainmamba-l1_adapter-fpn_1xb4-synthetic_coco-shapes.py',
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
# COCO bbox/segm on the validation images every 100 iterations (the base
# validates once, at the end): AP beside the ratio curve during the run
train_cfg = dict(val_interval=100)
