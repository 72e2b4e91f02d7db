from .aux_loss_hook import DyVMAuxLossHook
from .checkpoint_hook import CheckpointHook, CheckpointSaveError
from .pruning_meta_hook import (
    PruningMetaHook,
    format_pruning,
    pruner_meta,
    pruning_meta,
)
from .resume_hook import ResumeHook

__all__ = [
    'CheckpointHook',
    'CheckpointSaveError',
    'DyVMAuxLossHook',
    'PruningMetaHook',
    'ResumeHook',
    'format_pruning',
    'pruner_meta',
    'pruning_meta',
]
