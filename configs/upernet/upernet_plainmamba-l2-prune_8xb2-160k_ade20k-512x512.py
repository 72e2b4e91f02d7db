"""The dense config with token pruning: the paper's schedule, aligned.

As the adapter configs' ``-prune``: tokens are pruned after the layers of
the paper's schedule, the selective scan keeps the pruned tokens' positions,
and the pruned tokens keep their features on the full-grid output maps.
"""

_base_ = './upernet_plainmamba-l2_8xb2-160k_ade20k-512x512.py'

model = dict(backbone=dict(prune_cfg='paper'))
