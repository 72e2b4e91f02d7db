# The ViT-Adapter (mmssm.ViTAdapter) around a plain SSM backbone, with the
# settings of ViT-Adapter-T/S (DeiT-T/S have 12 blocks; PlainMamba-L1/L2
# and Vim-T/S have 24 layers, hence 4 interactions of 6 layers): 4 maps of
# the backbone's embed_dims channels at strides 4, 8, 16 and 32, SyncBN.
# The detection and segmentation primitives put it in place of the upstream
# model's backbone and name their SSM backbone:
#
#     model = dict(
#         backbone=dict(
#             _base_.vit_adapter,
#             _delete_=True,
#             backbone=dict(type='mmssm.PlainMamba', arch='l1', ...)))
#
# It is a variable, not `model`: the upstream model base of the primitives
# defines `model` too, and mmengine refuses a key that two bases define.
vit_adapter = dict(
    type='mmssm.ViTAdapter',
    conv_inplane=64,
    n_points=4,
    deform_num_heads=6,
    cffn_ratio=0.25,
    deform_ratio=1.0,
    init_values=0.0,
    interaction_indexes=[[0, 5], [6, 11], [12, 17], [18, 23]],
    add_vit_feature=True,
    norm_cfg=dict(type='SyncBN', requires_grad=True))
