from .dyvm_classifier import build_dyvm_classifier  # noqa: F401
from .image_classifier import build_classifier, pooled_out_type

__all__ = ['build_classifier', 'pooled_out_type']
