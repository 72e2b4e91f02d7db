"""The dense config with token pruning: the paper's schedule, aligned.

Tokens are pruned after the layers of the paper's schedule for this
backbone (``prune_cfg='paper'``), and the selective scan keeps the pruned
tokens' positions (pruning-aware hidden-state alignment).
"""

_base_ = './mask-rcnn_plainmamba-l2_adapter-fpn_8xb2-1x_coco.py'

model = dict(backbone=dict(backbone=dict(prune_cfg='paper')))
