"""Training-side components: the Runner, hooks and optimizer constructors."""

from .hooks import CheckpointHook, PruningMetaHook, ResumeHook
from .optimizers import SSMOptimWrapperConstructor
from .runner import Runner

__all__ = [
    'CheckpointHook',
    'PruningMetaHook',
    'ResumeHook',
    'Runner',
    'SSMOptimWrapperConstructor',
]
