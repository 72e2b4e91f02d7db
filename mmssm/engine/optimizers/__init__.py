from .ssm_constructor import SSMOptimWrapperConstructor

__all__ = ['SSMOptimWrapperConstructor']
