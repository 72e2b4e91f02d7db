"""The dense config with naive token pruning (the paper's baseline).

The same schedule as the ``-prune`` config, but the kept tokens are scanned
as a shorter sequence, without hidden-state alignment (``align=False``).
"""

_base_ = './mask-rcnn_vim-t_adapter-fpn_8xb2-1x_coco.py'

model = dict(
    backbone=dict(backbone=dict(prune_cfg=dict(schedule='paper', align=False)))
)
