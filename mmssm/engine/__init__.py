"""Training-side components: optimizer wrapper constructors and hooks."""

from .hooks import PruningMetaHook
from .optimizers import SSMOptimWrapperConstructor

__all__ = ['PruningMetaHook', 'SSMOptimWrapperConstructor']
