from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def resize_pos_embed(
    pos_embed: Tensor,
    src_shape: Tuple[int, int],
    dst_shape: Tuple[int, int],
    mode: str = 'bicubic',
) -> Tensor:
    """Resize a grid of position embeddings.

    Args:
        pos_embed (Tensor): (1, H*W, C), the grid in raster order.
        src_shape (tuple[int, int]): (H, W) of ``pos_embed``.
        dst_shape (tuple[int, int]): (H', W') wanted.
        mode (str): Interpolation mode. Defaults to 'bicubic'.

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
    C = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, *src_shape, C).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid.float(), size=tuple(dst_shape), mode=mode, align_corners=False
    ).to(pos_embed.dtype)
    return grid.flatten(2).transpose(1, 2)


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
