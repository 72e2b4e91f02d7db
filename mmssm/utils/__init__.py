"""Utilities of mmssm.

The FLOPs counter (:mod:`mmssm.utils.flops`) loads the ops stack, so its
names are imported on first access only: ``import mmssm`` stays light.
"""

import importlib
from typing import Any

from .checkpoint import allow_mmengine_checkpoints

_FLOPS_NAMES = (
    'SCAN_CONVENTIONS',
    'FlopsReport',
    'count_flops',
    'count_params',
    'infer_scan_convention',
)

__all__ = ['allow_mmengine_checkpoints', *_FLOPS_NAMES]


def __getattr__(name: str) -> Any:
    # PEP 562: ``from mmssm.utils import count_flops`` imports flops here
    if name in _FLOPS_NAMES:
        return getattr(importlib.import_module('.flops', __name__), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
