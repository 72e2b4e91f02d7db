from .dyvm_classifier import build_dyvm_classifier  # noqa: F401
from .ssm_classifier import SSMClassifier

__all__ = ['SSMClassifier']
