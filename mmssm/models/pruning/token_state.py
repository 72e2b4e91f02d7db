"""The tokens flowing through a token-pruned backbone."""

from dataclasses import dataclass, field
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
        index (Tensor, optional): (B, K) int64, the positions of ``tokens``
            in the full sequence; None while nothing is pruned or moved.
            Sorted, except where a learned pruner re-centres the class
            token (:class:`~mmssm.models.pruning.LearnedTokenPruner`,
            ``align=False``) or permutes the full sequence (its masked
            training mode).
        frozen (Tensor, optional): (B, L, C), the full sequence in which a
            pruned token keeps its value from the step that pruned it; None
            while nothing is pruned. In the masked mode (every token still
            in ``tokens``): the tokens as the layers left them, in the
            order of ``tokens``, from which a masked token is restored if a
            driver of the layers changed it between their runs (the
            adapter's injector), as a deleted token is never changed.
        cls_index (int, optional): Position of a class token in the full
            sequence (Vim's middle class token); it is never pruned.
            Defaults to None.
        patch_stride (int): Input pixels per token along each side (16 for
            the released models). Defaults to 16.
        token_mask (Tensor, optional): (B, K) float {0, 1}, the masked mode
            of learned pruning in training: every token is computed at full
            length and the pruned ones are masked (0) in the mixers and
            keep their value (frozen) in the stream. Its values are exact
            0/1 with straight-through gradients. None: no mask.
            Defaults to None.
        aux (dict): What the layers and the pruner report during one
            forward (``token_decisions``, ``direction_gates``); one dict
            shared by the states of a forward. Defaults to an empty dict.
    """

    tokens: Tensor
    hw: Tuple[int, int]
    index: Optional[Tensor] = None
    frozen: Optional[Tensor] = None
    cls_index: Optional[int] = None
    patch_stride: int = 16
    token_mask: Optional[Tensor] = None
    aux: dict = field(default_factory=dict)

    @property
    def pruned(self) -> bool:
        """Whether the state holds a subset of the sequence (or, masked,
        masks part of it)."""
        return self.index is not None or self.token_mask is not None

    @property
    def masked(self) -> bool:
        """Whether the state is in the masked (full-length) mode."""
        return self.token_mask is not None

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
        # masked mode: a permutation of the whole sequence, nothing frozen
        base = self.tokens if self.frozen is None else self.frozen
        return base.to(self.tokens.dtype).scatter(1, index, self.tokens)

    def kept_mask(self) -> Tensor:
        """(B, L) bool: True at the positions of the computed tokens (in
        the masked mode: of the tokens not masked)."""
        batch = self.tokens.shape[0]
        if self.token_mask is not None:
            kept = self.token_mask > 0.5
            if self.index is None:
                return kept
            return torch.zeros_like(kept).scatter(1, self.index, kept)
        if self.index is None:
            return self.tokens.new_ones(batch, self.seq_len, dtype=torch.bool)
        mask = self.tokens.new_zeros(batch, self.seq_len, dtype=torch.bool)
        return mask.scatter(1, self.index, True)

    def cls_slots(self) -> Optional[Tensor]:
        """(B,) int64: the slot of the class token in ``tokens`` per image
        (it moves when a learned pruner re-centres it), or None without a
        class token."""
        if self.cls_index is None:
            return None
        batch = self.tokens.shape[0]
        device = self.tokens.device
        if self.index is None:
            return torch.full((batch,), self.cls_index, device=device)
        return (self.index == self.cls_index).long().argmax(dim=1)

    def patch_kept_mask(self) -> Tensor:
        """(B, h, w) bool: the kept patch tokens on the grid (the class
        token, never pruned, left out)."""
        mask = self.kept_mask()
        if self.cls_index is not None:
            c = self.cls_index
            mask = torch.cat([mask[:, :c], mask[:, c + 1 :]], dim=1)
        return mask.reshape(mask.shape[0], *self.hw)
