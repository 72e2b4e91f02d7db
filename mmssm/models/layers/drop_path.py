"""Stochastic depth, shared by the backbones."""

import torch.nn as nn
from torch import Tensor


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample.

    The kept samples are scaled by ``1 / keep`` so that the expectation is
    unchanged.

    Args:
        drop_prob (float): Probability of dropping. Defaults to 0.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1))
        return x * mask.bernoulli_(keep) / keep

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob}'
