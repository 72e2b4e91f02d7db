# 30 epochs of ImageNet fine-tuning from a dense checkpoint at a constant lr:
# the ToP recipe for Vim ("Exploring Token Pruning in Vision State Space
# Models", NeurIPS 2024, which states a constant lr but whose values are not
# legible in our copy), with Vim's own fine-tuning defaults (hustvl/Vim
# scripts/ft-vim-*.sh; ToP's released fine-tuning scripts pass the same
# values, with 8 x 64 images for Vim-T): ./imagenet_finetune_30e.py (AdamW,
# mmssm's constructor: no weight decay on norms, biases and the SSM
# parameters; weight decay 1e-8; 30 epochs) at lr 5e-6 for a total batch of
# 512 (DeiT's code scales it by batch / 512: auto_scale_lr), no drop path.
# The scripts also pass a warm-up lr and a minimum lr of 1e-5, which only
# keep timm's schedule between 5e-6 and 1e-5: the lr is held at 5e-6 here.
_base_ = ['./imagenet_finetune_30e.py']

optim_wrapper = dict(optimizer=dict(lr=5e-6))
param_scheduler = []  # constant
