"""Position-embedding helpers: the bicubic resize of a grid (timm's) and
Vim's class slot in the middle of the sequence."""

from typing import Optional, Tuple

import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor


def resize_pos_embed(
    pos_embed: Tensor,
    src_shape: Tuple[int, int],
    dst_shape: Tuple[int, int],
) -> Tensor:
    """Resize a (1, H*W, C) grid of position embeddings bicubically.

    timm's resampling, without anti-aliasing (as the released models
    resize) and with the dtype kept.

    Args:
        pos_embed (Tensor): (1, H*W, C), the grid in raster order.
        src_shape (tuple[int, int]): (H, W) of ``pos_embed``.
        dst_shape (tuple[int, int]): (H', W') wanted.

    Returns:
        Tensor: (1, H'*W', C).
    """
    if tuple(src_shape) == tuple(dst_shape):
        return pos_embed
    if (
        pos_embed.dim() != 3
        or pos_embed.shape[1] != src_shape[0] * src_shape[1]
    ):
        raise ValueError(
            f'pos_embed of shape {tuple(pos_embed.shape)} is '
            f'not a (1, {src_shape[0]}*{src_shape[1]}, C) grid'
        )
    return resample_abs_pos_embed(
        pos_embed,
        list(dst_shape),
        list(src_shape),
        num_prefix_tokens=0,
        antialias=False,
    )


def split_cls_slot(
    pos_embed: Tensor, with_cls: bool
) -> Tuple[Optional[Tensor], Tensor]:
    """Split a middle class slot off a (1, M [+ 1], C) embedding.

    Args:
        pos_embed (Tensor): The embedding; with ``with_cls`` the class slot
            is at ``M // 2`` of the M grid entries.
        with_cls (bool): Whether ``pos_embed`` has a class slot.

    Returns:
        tuple[Tensor | None, Tensor]: The class slot (1, 1, C) or None, and
        the grid part (1, M, C).
    """
    if not with_cls:
        return None, pos_embed
    mid = (pos_embed.shape[1] - 1) // 2
    grid = torch.cat([pos_embed[:, :mid], pos_embed[:, mid + 1 :]], 1)
    return pos_embed[:, mid : mid + 1], grid


def insert_cls_slot(grid: Tensor, cls_slot: Optional[Tensor]) -> Tensor:
    """Insert a class slot at ``M // 2`` of a (1, M, C) grid embedding.

    The inverse of :func:`split_cls_slot`; None returns ``grid``.
    """
    if cls_slot is None:
        return grid
    mid = grid.shape[1] // 2
    return torch.cat([grid[:, :mid], cls_slot, grid[:, mid:]], 1)
