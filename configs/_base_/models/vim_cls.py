# Vim ImageNet-1K classifier (model only): the middle class token (after
# norm_f) -> linear head. Converted official checkpoints (vim2mmssm.py) load
# into it (backbone.*, head.fc.*).
model = dict(
    type='mmssm.SSMClassifier',
    backbone=dict(
        type='mmssm.Vim',
        arch='t',
        img_size=224,
        drop_path_rate=0.0,
        init_cfg=None),
    num_classes=1000)
