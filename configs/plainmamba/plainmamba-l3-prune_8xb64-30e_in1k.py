"""PlainMamba-L3 pruned (aligned), fine-tuned on ImageNet-1K.

Tokens are pruned after the layers of the paper's schedule
(``prune_cfg='paper'``) and the selective scan keeps the pruned tokens'
positions (pruning-aware hidden-state alignment).

Fine-tuned for 30 epochs from the converted dense checkpoint (``load_from``
of the dense config) with the dense config's recipe (ToP's for PlainMamba:
AdamW, weight decay 1e-8, lr 2e-5 for a batch of 512, 5 warm-up epochs from
2e-8, cosine to 2e-7), 8 GPUs x 64 images.

Paper (Table 1): 8.44 G FLOPs, 81.7% top-1 after fine-tuning.
"""

_base_ = './plainmamba-l3_8xb64_in1k.py'

model = dict(backbone=dict(prune_cfg='paper'))
