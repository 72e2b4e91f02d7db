from .pruning_meta_hook import (
    PruningMetaHook,
    format_pruning,
    pruner_meta,
    pruning_meta,
)

__all__ = ['PruningMetaHook', 'format_pruning', 'pruner_meta', 'pruning_meta']
