"""The main job: the L1-prune detector trained on synthetic shapes (CPU).

The model of ``mask-rcnn_plainmamba-l1-prune_adapter-fpn_8xb2-1x_coco.py``
(PlainMamba-L1, the paper's pruning schedule with alignment, ViT-Adapter,
FPN, Mask R-CNN) with the CPU settings of
``mask-rcnn_plainmamba-l1_adapter-fpn_1xb4-synthetic_coco-shapes.py`` (see
its docstring), trained from scratch for a few minutes on 2 CPU cores.
Made by ``tools/main_job.sh``.
"""

_base_ = './mask-rcnn_plainmamba-l1_adapter-fpn_1xb4-synthetic_coco-shapes.py'

model = dict(backbone=dict(backbone=dict(prune_cfg='paper')))
