"""Helpers for mmssm's tests (as ``mmdet.testing``).

``ops``: the op-test helpers (random positions, outputs with gradients,
relative comparison); ``models``: the catalogue of tiny architectures.
"""

from .ops import assert_close_rel, output_and_grads, random_positions

__all__ = ['assert_close_rel', 'output_and_grads', 'random_positions']
