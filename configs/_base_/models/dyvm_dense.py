# DyVM's learned token pruning and direction selection (Dynamic Vision
# Mamba, arXiv 2504.04787) for the detection and segmentation configs,
# as its segmentation release runs it on Vim: a learned predictor prunes
# after the 6th, 12th and 18th of 24 layers (after each quarter: L3's 9th,
# 18th, 27th of 36), keeping r, r**2, r**3 of the patch tokens (hard
# Gumbel-softmax decisions in training, the top int(r**s M) at
# inference); pruned tokens are frozen and filled back on the full grid
# that the adapter's extractors and the heads read; a direction gate in
# every layer (no class token: it reads the mean of the kept tokens).
# r: Vim-T 0.9 and Vim-S 0.8 as released for segmentation; PlainMamba
# (ours, no release) takes Vim-S's 0.8. align=False is DyVM's
# rearrangement, align=True our aligned scan (the -dyvm-align configs).
# The token-ratio and direction-ratio losses (weights 20 and 20, direction
# target 0.8, as released for segmentation) reach the model's loss dict
# through mmssm.Runner's default hook, default_hooks.dyvm_aux_loss
# (mmssm.DyVMAuxLossHook): its fields change them, e.g.
# default_hooks = dict(dyvm_aux_loss=dict(
#     direction_ratio_loss=dict(target=0.7)))
dyvm_prune_cfg = dict(
    type='mmssm.LearnedTokenPruner',
    layers=(6, 12, 18),
    keep_ratios=0.8,
    align=False,
)
