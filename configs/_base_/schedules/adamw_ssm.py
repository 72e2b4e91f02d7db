# AdamW for SSM backbones, by mmssm.SSMOptimWrapperConstructor: no weight
# decay on norms (norm_decay_mult=0, extended by the constructor to every
# class whose name ends with Norm, e.g. Vim's RMSNorm and PlainMamba's ln1)
# nor on the parameters that the models tag `_no_weight_decay` (A_log, D,
# direction_Bs, pos_embed, cls_token, level_embed, ...). The primitives take
# it with their own lr and weight decay (and paramwise settings, if any):
#
#     optim_wrapper = dict(
#         _base_.ssm_optim_wrapper,
#         _delete_=True,  # replaces the upstream schedule's SGD
#         optimizer=dict(
#             _base_.ssm_optim_wrapper.optimizer, lr=1e-4, weight_decay=0.05))
#
# It is a variable, not `optim_wrapper`: the upstream schedule base of the
# primitives defines `optim_wrapper` too, and mmengine refuses a key that
# two bases define.
ssm_optim_wrapper = dict(
    type='OptimWrapper',
    constructor='mmssm.SSMOptimWrapperConstructor',
    optimizer=dict(type='AdamW', betas=(0.9, 0.999)),
    paramwise_cfg=dict(norm_decay_mult=0.0))
