"""Vim-S pruned (naive), fine-tuned on ImageNet-1K.

The same schedule as the ``-prune`` config, but the kept tokens are scanned
as a shorter sequence, without hidden-state alignment (``align=False``):
the naive, ViT-style baseline of the paper.

Fine-tuned for 30 epochs from the converted dense checkpoint (``load_from``
of the dense config) with the dense config's recipe (Vim's fine-tuning
defaults: AdamW, weight decay 1e-8, constant lr 5e-6 for a batch of 512),
8 GPUs x 64 images.

Paper (Table 1): 3.57 G FLOPs, 74.8% top-1 after fine-tuning.
"""

_base_ = './vim-s_8xb64_in1k.py'

model = dict(backbone=dict(prune_cfg=dict(schedule='paper', align=False)))
