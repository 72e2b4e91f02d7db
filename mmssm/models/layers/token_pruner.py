"""Token state of a backbone whose tokens may be pruned as it runs.

A backbone that prunes keeps computing only its kept tokens, in their
original order, and remembers every pruned token as it was when it was
pruned ("freeze and fill"): dense heads and the adapter always get the full
sequence back from :meth:`TokenState.full`.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

from torch import Tensor


@dataclass
class TokenState:
    """The tokens flowing through a backbone.

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
    """
    tokens: Tensor
    hw: Tuple[int, int]
    index: Optional[Tensor] = None
    frozen: Optional[Tensor] = None
    cls_index: Optional[int] = None

    @property
    def pruned(self) -> bool:
        return self.index is not None

    def full(self) -> Tensor:
        """(B, L, C): kept tokens scattered back among the frozen ones."""
        if self.index is None:
            return self.tokens
        index = self.index[..., None].expand(-1, -1, self.tokens.shape[-1])
        return self.frozen.to(self.tokens.dtype).scatter(1, index,
                                                         self.tokens)
