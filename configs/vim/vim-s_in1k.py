# Vim-S (Zhu et al., ICML 2024), ImageNet-1K classifier at 224x224, model
# only: it serves FLOPs/params (tools/analysis_tools/get_flops.py) and
# checkpoint conversion (tools/model_converters/vim2mmssm.py), not training.
# Paper (Table 1 of "Exploring Token Pruning in Vision State Space Models"):
# 26 M params, 5.10 G FLOPs (multiply-accumulates, scan convention 'vim':
# 3*K*E*N per scan direction).
_base_ = ['../_base_/models/vim_cls.py']

model = dict(backbone=dict(arch='small'))
