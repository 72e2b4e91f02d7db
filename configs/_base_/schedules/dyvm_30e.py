# DyVM's 30-epoch fine-tuning (NUS-HPC-AI-Lab/DyVM, the recipe of its
# classification scripts): AdamW, weight decay 1e-8, 5 warm-up epochs from
# lr 1e-5, then cosine down to 1e-6; fp32, no gradient clipping, no drop
# path. The released scripts scale the lr by total batch / 512; each DyVM
# primitive sets its scaled lr and its warm-up start (1e-5 / lr):
#
#     optim_wrapper = dict(optimizer=dict(lr=2.5e-5))
#     param_scheduler = [
#         dict(_base_.param_scheduler[0], start_factor=1e-5 / 2.5e-5),
#         _base_.param_scheduler[1],
#     ]
#     auto_scale_lr = dict(base_batch_size=256)
_base_ = ['./adamw_ssm.py']

optim_wrapper = dict(
    _base_.ssm_optim_wrapper,
    optimizer=dict(
        _base_.ssm_optim_wrapper.optimizer, lr=5e-5, weight_decay=1e-8
    ),
    paramwise_cfg=dict(
        _base_.ssm_optim_wrapper.paramwise_cfg, bias_decay_mult=0.0
    ),
)
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-5 / 5e-5,
        by_epoch=True,
        begin=0,
        end=5,
        convert_to_iter_based=True,
    ),
    dict(
        type='CosineAnnealingLR',
        eta_min=1e-6,
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
