"""The dense config with naive token pruning (the paper's baseline).

The same schedule as the ``-prune`` config, but the kept tokens are scanned
as a shorter sequence, without hidden-state alignment (``align=False``).
"""

_base_ = './upernet_plainmamba-l1_8xb2-160k_ade20k-512x512.py'

# `_delete_`: the base's prune_cfg is None, which a dict cannot merge into
model = dict(
    backbone=dict(prune_cfg=dict(_delete_=True, schedule='paper', align=False))
)
