"""Vim-S pruned (aligned), fine-tuned on ImageNet-1K.

Patch tokens are pruned after the layers of the paper's schedule
(``prune_cfg='paper'``; never the class token) and the selective scan keeps
the pruned tokens' positions (pruning-aware hidden-state alignment).

Fine-tuned for 30 epochs from the converted dense checkpoint (``load_from``
of the dense config) with the dense config's recipe (Vim's fine-tuning
defaults: AdamW, weight decay 1e-8, constant lr 5e-6 for a batch of 512),
8 GPUs x 64 images.

Paper (Table 1): 3.60 G FLOPs, 78.8% top-1 after fine-tuning.
"""

_base_ = './vim-s_8xb64_in1k.py'

model = dict(backbone=dict(prune_cfg='paper'))
