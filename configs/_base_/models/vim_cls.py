# Vim ImageNet-1K classifier, mmpretrain's ImageClassifier: the middle class
# token after the final norm norm_f (the backbone's pooled out_type
# 'cls_token', as the release classifies) -> a linear head, keys backbone.*
# and head.fc.* (vim2mmssm.py without --dense writes them). Loss and batch
# augments of Vim's DeiT-based training: label smoothing 0.1, Mixup 0.8 /
# CutMix 1.0. No drop path (Vim's fine-tuning default).
model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='mmssm.Vim',
        arch='tiny',
        img_size=224,
        out_type='cls_token',
        drop_path_rate=0.0,
    ),
    neck=None,
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=192,
        loss=dict(
            type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'
        ),
        topk=(1, 5),
    ),
    train_cfg=dict(
        augments=[
            dict(type='Mixup', alpha=0.8),
            dict(type='CutMix', alpha=1.0),
        ]
    ),
)
