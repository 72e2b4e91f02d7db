"""Helpers for mmssm's tests (as ``mmdet.testing``).

``ops``: the op-test helpers (random positions, outputs with gradients,
relative comparison); ``models``: the catalogue of tiny architectures.
"""

from .models import (
    BACKBONE_TYPES,
    TINY_ARCHS,
    TINY_PRUNE,
    family_of,
    shrink_prune_cfg,
    tiny_arch,
    tiny_backbone_cfg,
)
from .ops import (
    assert_close_rel,
    in_ci,
    needs_ext,
    output_and_grads,
    random_positions,
)

__all__ = [
    'BACKBONE_TYPES',
    'TINY_ARCHS',
    'TINY_PRUNE',
    'family_of',
    'shrink_prune_cfg',
    'tiny_arch',
    'tiny_backbone_cfg',
    'assert_close_rel',
    'in_ci',
    'needs_ext',
    'output_and_grads',
    'random_positions',
]
