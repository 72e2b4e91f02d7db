"""PlainMamba-L2 pruned (naive), fine-tuned on ImageNet-1K.

The same schedule as the ``-prune`` config, but the kept tokens are scanned
as a shorter sequence, without hidden-state alignment (``align=False``):
the naive, ViT-style baseline of the paper.

Fine-tuned for 30 epochs from the converted dense checkpoint (``load_from``
of the dense config) with the dense config's recipe (ToP's for PlainMamba:
AdamW, weight decay 1e-8, lr 2e-5 for a batch of 512, 5 warm-up epochs from
2e-8, cosine to 2e-7), 8 GPUs x 64 images.

Paper (Table 1): 6.22 G FLOPs, 78.3% top-1 after fine-tuning.
"""

_base_ = './plainmamba-l2_8xb64_in1k.py'

model = dict(backbone=dict(prune_cfg=dict(schedule='paper', align=False)))
