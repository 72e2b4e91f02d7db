# PlainMamba ImageNet-1K classifier (model only): the backbone's averaged
# tokens (after ln1) -> linear head. Layout of the official checkpoints
# (backbone.*, head.fc.*).
model = dict(
    type='mmssm.SSMClassifier',
    backbone=dict(
        type='mmssm.PlainMamba',
        arch='l1',
        img_size=224,
        drop_path_rate=0.0,
        init_cfg=None),
    num_classes=1000)
