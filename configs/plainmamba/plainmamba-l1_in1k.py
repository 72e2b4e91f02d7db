# PlainMamba-L1 (Yang et al., BMVC 2024), ImageNet-1K classifier at 224x224,
# model only: it serves FLOPs/params (tools/analysis_tools/get_flops.py) and
# checkpoint conversion (tools/model_converters/plainmamba2mmssm.py).
# Table 1 of "Exploring Token Pruning in Vision State Space Models": 7 M
# params (PlainMamba's release: 7.3 M, the backbone without the 1000-class
# head; 7.55 M with it), 3.0 G FLOPs (multiply-accumulates; scan convention
# 'plainmamba': 9*K*E*N per scan direction).
_base_ = ['../_base_/models/plainmamba_cls.py']

model = dict(backbone=dict(arch='l1'))
