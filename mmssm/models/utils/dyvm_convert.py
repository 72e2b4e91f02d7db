"""The key map of the released DyVM-Vim checkpoints (NUS-HPC-AI-Lab/DyVM).

A released DyVM-Vim file is a DeiT-style ``{'model': ...}`` checkpoint of
Vim (the keys of :func:`~mmssm.models.utils.ckpt_convert.convert_vim`) plus
DyVM's modules:

* ``score_predictors.{s}.{in_conv,out_conv}.*``, the token predictor of
  step ``s`` (``PredictorLG``) -> ``backbone.pruner.scorer.predictors.{s}.*``
  of :class:`~mmssm.models.pruning.LearnedTokenPruner` (same layout);
* ``layers.{i}.mixer.block_head.{weight,bias}``, the direction gate of
  layer ``i`` -> ``backbone.layers.{i}.mixer.direction_gate.fc.*``
  (:class:`~mmssm.models.layers.DirectionGate`).

The output loads into the ``configs/dyvm`` DyVM-Vim classifiers
(``mmssm.DyVMClassifier``: Vim with the middle class token,
``prune_cfg='dyvm'``, ``direction_gate=True``, ``head.fc``).
"""

from typing import Dict, Mapping

from torch import Tensor

from .ckpt_convert import VIM_RULES, convert_by_rules, unwrap_state_dict

#: DyVM's own modules, then Vim's keys (classifier layout).
DYVM_VIM_RULES = [
    (
        r'score_predictors\.(\d+)\.((in|out)_conv\.\d+\.(weight|bias))',
        r'backbone.pruner.scorer.predictors.\1.\2',
    ),
    (
        r'layers\.(\d+)\.mixer\.block_head\.(weight|bias)',
        r'backbone.layers.\1.mixer.direction_gate.fc.\2',
    ),
    *VIM_RULES,
]
# EMA copies if a checkpoint was flattened (DeiT keeps them apart).
_DYVM_DROP = (r'ema_.*', r'model_ema\..*')


def convert_dyvm_vim(state_dict: Mapping) -> Dict[str, Tensor]:
    """Convert a released DyVM-Vim ImageNet checkpoint.

    Args:
        state_dict (Mapping): The checkpoint ``{'model': ...}`` or the bare
            state dict.

    Returns:
        dict[str, Tensor]: The state dict of the DyVM classifier.

    Raises:
        KeyError: Listing every key that no rule maps (an error, never a
            silent drop).
    """
    state_dict = unwrap_state_dict(state_dict, wrappers=('model',))
    return convert_by_rules(
        state_dict,
        DYVM_VIM_RULES,
        drop=_DYVM_DROP,
        source='DyVM-Vim checkpoint',
    )
