from .ssm_classifier import SSMClassifier

__all__ = ['SSMClassifier']
