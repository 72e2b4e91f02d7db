"""The dense config with naive token pruning (the paper's baseline).

The same schedule as the ``-prune`` config, but the kept tokens are scanned
as a shorter sequence, without hidden-state alignment (``align=False``).
"""

_base_ = './upernet_plainmamba-l1_8xb2-160k_ade20k-512x512.py'

model = dict(backbone=dict(prune_cfg=dict(schedule='paper', align=False)))
