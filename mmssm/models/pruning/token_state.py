"""The tokens flowing through a token-pruned backbone."""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor


@dataclass
class TokenState:
    """The tokens flowing through a backbone.

    A backbone that prunes keeps computing only its kept tokens, in their
    original order, and remembers every pruned token as it was when it was
    pruned ("freeze and fill"): dense heads and the adapter always get the
    full sequence back from :meth:`full`.

    Args:
        tokens (Tensor): (B, K, C), the tokens still computed.
        hw (tuple[int, int]): The patch grid (h, w).
        index (Tensor, optional): (B, K) int64, the sorted positions of
            ``tokens`` in the full sequence; None while nothing is pruned.
        frozen (Tensor, optional): (B, L, C), the full sequence in which a
            pruned token keeps its value from the step that pruned it; None
            while nothing is pruned.
        cls_index (int, optional): Position of a class token in the full
            sequence (Vim's middle class token); it is never pruned.
            Defaults to None.
        patch_stride (int): Input pixels per token along each side (16 for
            the released models). Defaults to 16.
    """

    tokens: Tensor
    hw: Tuple[int, int]
    index: Optional[Tensor] = None
    frozen: Optional[Tensor] = None
    cls_index: Optional[int] = None
    patch_stride: int = 16

    @property
    def pruned(self) -> bool:
        """Whether the state holds a subset of the sequence."""
        return self.index is not None

    @property
    def seq_len(self) -> int:
        """Length L of the full sequence."""
        if self.frozen is not None:
            return self.frozen.shape[1]
        return self.tokens.shape[1]

    def full(self) -> Tensor:
        """(B, L, C): kept tokens scattered back among the frozen ones."""
        if self.index is None:
            return self.tokens
        index = self.index[..., None].expand(-1, -1, self.tokens.shape[-1])
        return self.frozen.to(self.tokens.dtype).scatter(1, index, self.tokens)

    def kept_mask(self) -> Tensor:
        """(B, L) bool: True at the positions of the computed tokens."""
        batch = self.tokens.shape[0]
        if self.index is None:
            return self.tokens.new_ones(batch, self.seq_len, dtype=torch.bool)
        mask = self.tokens.new_zeros(batch, self.seq_len, dtype=torch.bool)
        return mask.scatter(1, self.index, True)

    def patch_kept_mask(self) -> Tensor:
        """(B, h, w) bool: the kept patch tokens on the grid (the class
        token, never pruned, left out)."""
        mask = self.kept_mask()
        if self.cls_index is not None:
            c = self.cls_index
            mask = torch.cat([mask[:, :c], mask[:, c + 1 :]], dim=1)
        return mask.reshape(mask.shape[0], *self.hw)
