# dyvm_classifier imports mmpretrain: configs name it in custom_imports
from .image_classifier import build_classifier, pooled_out_type

__all__ = ['build_classifier', 'pooled_out_type']
