from typing import Tuple

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
