# DyVM's 30-epoch fine-tuning (NUS-HPC-AI-Lab/DyVM, the recipe of its
# classification scripts): the shape of ./imagenet_finetune_30e.py (AdamW,
# weight decay 1e-8, 5 warm-up epochs, then cosine; fp32, no gradient
# clipping, no drop path) with DyVM's numbers: lr 5e-5 per total batch of
# 512, warm-up from 1e-5, cosine down to 1e-6. The released scripts scale
# the lr by total batch / 512; each DyVM primitive sets its scaled lr and
# its warm-up start (1e-5 / lr):
#
#     optim_wrapper = dict(optimizer=dict(lr=2.5e-5))
#     param_scheduler = [
#         dict(_base_.param_scheduler[0], start_factor=1e-5 / 2.5e-5),
#         _base_.param_scheduler[1],
#     ]
#     auto_scale_lr = dict(base_batch_size=256)
_base_ = ['./imagenet_finetune_30e.py']

optim_wrapper = dict(optimizer=dict(lr=5e-5))
param_scheduler = [
    dict(_base_.param_scheduler[0], start_factor=1e-5 / 5e-5),
    dict(_base_.param_scheduler[1], eta_min=1e-6),
]
