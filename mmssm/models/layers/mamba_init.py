"""Mamba's parameter initialisation, shared by the mixers.

As in the released Mamba code: ``A_log = log(1..N)`` for every channel and a
``dt_proj`` whose softplus'ed bias starts log-uniform in ``[dt_min,
dt_max]``.
"""

import math
from typing import Union

import torch
import torch.nn as nn
from torch import Tensor


def dt_rank_of(embed_dims: int, dt_rank: Union[int, str]) -> int:
    """The rank of the step projection; 'auto' is ``ceil(embed_dims / 16)``.

    Args:
        embed_dims (int): Model width.
        dt_rank (int | str): A rank or 'auto'.

    Returns:
        int: The rank.
    """
    return math.ceil(embed_dims / 16) if dt_rank == 'auto' else int(dt_rank)


def s4d_real_log(dim: int, d_state: int) -> Tensor:
    """S4D-real ``A_log``: ``log(1..d_state)`` repeated for ``dim`` rows.

    Args:
        dim (int): Channels.
        d_state (int): SSM state size N.

    Returns:
        Tensor: float32 (dim, d_state).
    """
    A = torch.arange(1, d_state + 1, dtype=torch.float32)
    return torch.log(A).repeat(dim, 1)


def init_dt_proj(
    dt_proj: nn.Linear,
    dt_min: float,
    dt_max: float,
    dt_scale: float,
    dt_init_floor: float,
) -> None:
    """Initialise a step projection in place.

    The weight is uniform in ``+-in_features**-0.5 * dt_scale``; the bias is
    ``softplus^-1(dt)``, ``dt`` log-uniform in ``[dt_min, dt_max]`` and
    floored at ``dt_init_floor``.

    Args:
        dt_proj (nn.Linear): (rank -> channels), with a bias.
        dt_min (float): Smallest initial step.
        dt_max (float): Largest initial step.
        dt_scale (float): Scale of the weight init.
        dt_init_floor (float): Floor of the initial steps.
    """
    std = dt_proj.in_features**-0.5 * dt_scale
    nn.init.uniform_(dt_proj.weight, -std, std)
    dt = torch.exp(
        torch.rand(dt_proj.out_features)
        * (math.log(dt_max) - math.log(dt_min))
        + math.log(dt_min)
    ).clamp(min=dt_init_floor)
    with torch.no_grad():  # softplus^-1(dt)
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
