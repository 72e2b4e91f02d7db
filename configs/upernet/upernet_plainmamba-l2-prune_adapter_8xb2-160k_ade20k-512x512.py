"""The dense config with token pruning: the paper's schedule, aligned.

Tokens are pruned after the layers of the paper's schedule for this
backbone (``prune_cfg='paper'``), and the selective scan keeps the pruned
tokens' positions (pruning-aware hidden-state alignment). The UperNet head
still gets full maps: the pruned tokens keep their features (see
``mmssm.ViTAdapter``).
"""

_base_ = './upernet_plainmamba-l2_adapter_8xb2-160k_ade20k-512x512.py'

model = dict(backbone=dict(backbone=dict(prune_cfg='paper')))
