# 30 epochs of ImageNet fine-tuning from a dense checkpoint: the ToP recipe
# for PlainMamba ("Exploring Token Pruning in Vision State Space Models",
# NeurIPS 2024): AdamW (mmssm's constructor: no weight decay on norms,
# biases and the SSM parameters the backbones tag), weight decay 1e-8, base
# lr 2e-5, 5 warm-up epochs from 2e-8, then cosine down to 2e-7. The paper
# gives no batch size: the lr is taken for a total batch of 512, as the
# DeiT-style code the recipes come from scales it (auto_scale_lr).
_base_ = ['./adamw_ssm.py']

optim_wrapper = dict(
    _base_.ssm_optim_wrapper,
    optimizer=dict(
        _base_.ssm_optim_wrapper.optimizer, lr=2e-5, weight_decay=1e-8
    ),
    paramwise_cfg=dict(
        _base_.ssm_optim_wrapper.paramwise_cfg, bias_decay_mult=0.0
    ),
)
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=2e-8 / 2e-5,
        by_epoch=True,
        begin=0,
        end=5,
        convert_to_iter_based=True,
    ),
    dict(
        type='CosineAnnealingLR',
        eta_min=2e-7,
        by_epoch=True,
        begin=5,
        end=30,
        convert_to_iter_based=True,
    ),
]
train_cfg = dict(by_epoch=True, max_epochs=30, val_interval=1)
val_cfg = dict()
test_cfg = dict()
auto_scale_lr = dict(base_batch_size=512)
