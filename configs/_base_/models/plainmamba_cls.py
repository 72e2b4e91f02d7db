# PlainMamba ImageNet-1K classifier, mmpretrain's ImageClassifier: the mean
# of the tokens after the final norm ln1 (the backbone's pooled out_type
# 'avg_featmap', as the release pools) -> a linear head, keys backbone.* and
# head.fc.* (the released layout, which plainmamba2mmssm.py keeps). Loss and
# batch augments of the release and of DeiT's fine-tuning: label smoothing
# 0.1, Mixup 0.8 / CutMix 1.0. No drop path (the fine-tuning recipes'; the
# release pre-trained with 0.2 / 0.3 / 0.4).
model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='mmssm.PlainMamba',
        arch='l1',
        img_size=224,
        out_type='avg_featmap',
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
