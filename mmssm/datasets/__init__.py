"""Datasets: a synthetic COCO-format set of shapes for demos and tests."""

from .loading import ImageLoadError, LoadImageFromFile, LoadSegAnnotations
from .synthetic_cls import (
    CLS_CLASSES,
    make_synthetic_cls,
    write_synthetic_cls,
)
from .synthetic_coco import CLASSES, make_synthetic_coco, read_meta

__all__ = [
    'CLASSES',
    'CLS_CLASSES',
    'ImageLoadError',
    'LoadImageFromFile',
    'LoadSegAnnotations',
    'make_synthetic_cls',
    'make_synthetic_coco',
    'write_synthetic_cls',
    'read_meta',
]
