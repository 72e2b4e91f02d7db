"""Vim-B pruned (naive), fine-tuned on ImageNet-1K.

The pruning paper has no Vim-B: this config takes, unaligned, Vim-S's
schedule (the same depth, 24 layers; after layers 5, 10, 15 and 20, keeping
0.81 of the tokens at each step). No paper figure is known for it.

Fine-tuned for 30 epochs from the converted dense checkpoint (``load_from``
of the dense config) with the dense config's recipe (Vim's fine-tuning
defaults: AdamW, weight decay 1e-8, constant lr 5e-6 for a batch of 512),
8 GPUs x 64 images.
"""

_base_ = './vim-b_8xb64_in1k.py'

model = dict(
    backbone=dict(
        prune_cfg=dict(layers=(5, 10, 15, 20), keep_ratios=0.81, align=False)
    )
)
