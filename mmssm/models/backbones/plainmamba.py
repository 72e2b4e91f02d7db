"""PlainMamba (Yang et al., BMVC 2024), faithful to the released weights.

A non-hierarchical vision SSM: a convolutional stem to 1/16, a learned
absolute position embedding, then ``num_layers`` pre-norm blocks whose mixer
scans the token grid in four zig-zag orders. The mixer reproduces the
released model exactly, including its quirks (read from the official code,
``mmcls/plain_mamba_dev/models/plain_mamba/plain_mamba_layer.py``):

* only the input ``u`` is permuted into each zig-zag order; the step sizes,
  ``B`` and ``C`` of scan step ``k`` are those of the token at *raster*
  position ``k``, in all four scans;
* ``direction_Bs`` (5 x N: start, right, left, up, down) is added to ``B``
  by the move that arrived at each scan step (step 0 is 'start');
* the dt bias enters twice (``dt_proj`` with its bias, and the same bias
  again as the scan's ``delta_bias``);
* ``A``, ``D`` and ``dt_proj`` are shared by the four scans, so the ``D u``
  skip term counts four times; ``y = sum of the 4 scans``, then
  ``out_proj(y * silu(z))``.

The mixer also runs on a pruned subset of the tokens (``positions``), with
the pruning-aware hidden-state alignment of "Exploring Token Pruning in
Vision State Space Models" (NeurIPS 2024); see :class:`PlainMambaMixer`.
"""

from functools import lru_cache
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import ModuleList
from timm.layers import DropPath
from torch import Tensor

from mmssm.errors import UserError
from mmssm.models.layers import (
    add_gated,
    build_direction_gate,
    build_norm,
    dt_rank_of,
    init_dt_proj,
    record_gates,
    s4d_real_log,
)
from mmssm.models.layers.direction_gate import select_rows
from mmssm.models.pruning import TokenState
from mmssm.ops import masked_delta, selective_scan
from mmssm.registry import MODELS

from .base_backbone import SSMBackbone

# Rows of ``direction_Bs``: the move that arrived at a scan step.
START, RIGHT, LEFT, UP, DOWN = range(5)


# --------------------------------------------------------------------------
# Scan orders
# --------------------------------------------------------------------------
def _move(a: Tuple[int, int], b: Tuple[int, int]) -> int:
    (i0, j0), (i1, j1) = a, b
    if i1 == i0:
        return RIGHT if j1 == j0 + 1 else LEFT
    return DOWN if i1 == i0 + 1 else UP


@lru_cache(maxsize=64)
def _scan_orders_cpu(H: int, W: int) -> Tuple[Tensor, Tensor, Tensor]:
    rows = [
        (i, j)
        for i in range(H)
        for j in (range(W) if i % 2 == 0 else reversed(range(W)))
    ]
    cols = [
        (i, j)
        for j in range(W)
        for i in (range(H) if j % 2 == 0 else reversed(range(H)))
    ]
    paths = [rows, rows[::-1], cols, cols[::-1]]
    orders = torch.tensor(
        [[i * W + j for i, j in path] for path in paths], dtype=torch.long
    )
    moves = torch.tensor(
        [
            [START] + [_move(a, b) for a, b in zip(path[:-1], path[1:])]
            for path in paths
        ],
        dtype=torch.long,
    )
    ranks = torch.empty_like(orders)
    ranks.scatter_(1, orders, torch.arange(H * W).expand(4, -1).clone())
    return orders, ranks, moves


def scan_orders(
    hw_shape: Sequence[int], device: Union[str, torch.device] = 'cpu'
) -> Tuple[Tensor, Tensor, Tensor]:
    """PlainMamba's four zig-zag scan orders of an H x W token grid.

    Direction 0 is a row snake from the top-left corner, direction 1 the
    same path reversed (it starts in the bottom row: at its left end for even
    H, its right end for odd H), direction 2 a column snake from the
    top-left corner and direction 3 that path reversed (it starts in the
    right column). These are the official orders.

    Args:
        hw_shape (Sequence[int]): (H, W).
        device (str | torch.device): Where to put the tables.
            Defaults to 'cpu'.

    Returns:
        tuple[Tensor, Tensor, Tensor]: int64 (4, H*W) tables: ``orders``
        (scan step -> raster index of the token scanned), ``ranks`` (raster
        index -> scan step, the inverse) and ``moves`` (scan step -> row of
        ``direction_Bs``: the move that arrived at the step, 0 at step 0).
    """
    H, W = (int(s) for s in hw_shape)
    if H < 1 or W < 1:
        raise ValueError(f'hw_shape must be positive, got {(H, W)}')
    tables = _scan_orders_cpu(H, W)
    return tuple(t.to(device) for t in tables)


def _token_rows(t: Tensor, index: Tensor, images: Tensor) -> Tensor:
    """Tokens of a (B, C, L) tensor, as rows of C channels.

    Args:
        t (Tensor): (B, C, L), any strides (a transposed view of a Linear
            layer's (B, L, C) output is read without a copy).
        index (Tensor): int64 (R, K): row r takes the tokens ``index[r]``
            (of L) of image ``images[r]``.
        images (Tensor): int64 (R, ), the image of each row of ``index``.

    Returns:
        Tensor: (R, K, C), channels contiguous: a (R, C, K) transposed
        view of it is the tokens-major layout that the scan kernel loads as
        one vector per step (a contiguous (R, C, K) gather would cost it
        one load per channel).
    """
    batch, C, L = t.shape
    rows = t.transpose(1, 2).reshape(batch * L, C)
    flat = (index + images[:, None] * L).reshape(-1)
    return rows.index_select(0, flat).view(*index.shape, C)


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------
class ConvPatchEmbed(nn.Module):
    """PlainMamba's convolutional stem, stride 16.

    A 7x7 stride-2 conv + norm + ReLU (``stem``), ``num_convs`` x (3x3 conv +
    norm + ReLU) (``convs``), then an 8x8 stride-8 conv (``projection``).
    Before the projection the feature map is zero-padded at the bottom and
    right to a multiple of 8 (mmcv's 'corner' adaptive padding), so an input
    of H x W gives a ceil(H/16) x ceil(W/16) grid (for any H, W; e.g.
    112 x 137 -> 7 x 9).

    Args:
        in_channels (int): Image channels. Defaults to 3.
        embed_dims (int): Output channels. Defaults to 192.
        num_convs (int): Number of 3x3 conv blocks. Defaults to 1.
        stem_channels (int): Channels of the stem. Defaults to 64.
        norm_cfg (dict, optional): Config of the stem's norms; None means
            ``dict(type='BN')``. Defaults to None.
    """

    def __init__(
        self,
        in_channels: int = 3,
        embed_dims: int = 192,
        num_convs: int = 1,
        stem_channels: int = 64,
        norm_cfg: Optional[dict] = None,
    ) -> None:
        super().__init__()
        norm_cfg = norm_cfg or dict(type='BN')
        c = stem_channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c, 7, stride=2, padding=3, bias=False),
            build_norm(norm_cfg, c),
            nn.ReLU(inplace=True),
        )
        if num_convs > 0:
            convs = []
            for _ in range(num_convs):
                convs += [
                    nn.Conv2d(c, c, 3, padding=1, bias=False),
                    build_norm(norm_cfg, c),
                    nn.ReLU(inplace=True),
                ]
            self.convs = nn.Sequential(*convs)
        else:
            self.convs = None
        self.projection = nn.Conv2d(c, embed_dims, 8, stride=8)

    @staticmethod
    def out_size(hw: Sequence[int]) -> Tuple[int, int]:
        """Token grid of an input of size ``hw``: ceil(ceil(s / 2) / 8)."""
        return tuple(-(-((s + 1) // 2) // 8) for s in hw)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """Embed images.

        Args:
            x (Tensor): (B, C, H, W).

        Returns:
            tuple[Tensor, tuple[int, int]]: Tokens (B, h*w, embed_dims) in
            raster order and the grid (h, w).
        """
        x = self.stem(x)
        if self.convs is not None:
            x = self.convs(x)
        pad_h, pad_w = (-x.shape[2]) % 8, (-x.shape[3]) % 8
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.projection(x)
        hw = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), hw


class PlainMambaMixer(nn.Module):
    """PlainMamba's 2-D selective-scan mixer, dense or on pruned tokens.

    Args:
        embed_dims (int): Token channels d.
        d_state (int): SSM state size N. Defaults to 16.
        expand (int): Inner channels E = expand * d. Defaults to 2.
        conv_size (int): Depthwise conv kernel (odd). Defaults to 7.
        dt_rank (int | str): Rank of the step projection; 'auto' is
            ceil(d / 16). Defaults to 'auto'.
        dt_min (float): Smallest initial step. Defaults to 0.001.
        dt_max (float): Largest initial step. Defaults to 0.1.
        dt_init_floor (float): Floor of the initial steps.
            Defaults to 1e-4.
        dt_scale (float): Scale of the ``dt_proj`` weight init.
            Defaults to 1.0.
        bias (bool): Bias of ``in_proj`` and ``out_proj`` (True in all
            released models). Defaults to True.
        conv_bias (bool): Bias of the depthwise conv. Defaults to True.
        scan_impl (str): ``impl`` of :func:`mmssm.ops.selective_scan`.
            Defaults to 'auto'.
        direction_gate (bool | dict): Build DyVM's
            :class:`~mmssm.models.layers.DirectionGate` over the four scan
            directions (a dict: its keyword arguments; our extension, DyVM
            has no PlainMamba). In training each direction's scan output
            (its ``D u`` term included) is multiplied by its bit before
            the sum and ``* silu(z)``; at inference a direction's scan runs
            only on the images whose bit is on. Defaults to False.

    The pruned path (``positions`` given) keeps the released model's
    semantics, with every per-step quantity taken at the kept token's
    *original* scan step ``p`` in each direction:

    * the depthwise conv runs on the full H x W grid with zeros at the
      pruned positions (they have no ``in_proj`` output) and is read back at
      the kept tokens; ``x_proj``/``dt_proj`` run on the whole conv output,
      because scan step ``p`` takes its step size, ``B`` and ``C`` from the
      token at raster position ``p`` (the released model's quirk), which may
      itself be pruned (its conv output then only sees its kept
      neighbours);
    * ``B`` at step ``p`` gets the ``direction_Bs`` row of the move that
      arrived at step ``p`` of the full order;
    * aligned (``gap_mode`` 'prev' or 'null'): each direction scans the
      kept tokens in their order along that direction and passes their
      steps ``p`` as the scan's ``positions``, so the state advances across
      the pruned steps;
    * ``gap_mode='none'`` (the naive baseline): the same inputs, scanned as
      a compact sequence. The depthwise conv still runs on the scattered
      grid, as in the aligned path, so that the two differ by the
      alignment only.

    With all tokens kept, both paths equal the dense one.
    """

    def __init__(
        self,
        embed_dims: int,
        d_state: int = 16,
        expand: int = 2,
        conv_size: int = 7,
        dt_rank: Union[int, str] = 'auto',
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        bias: bool = True,
        conv_bias: bool = True,
        scan_impl: str = 'auto',
        direction_gate: Union[bool, dict] = False,
    ) -> None:
        super().__init__()
        if conv_size % 2 != 1:
            raise ValueError(f'conv_size must be odd, got {conv_size}')
        self.embed_dims = embed_dims
        self.d_state = d_state
        self.d_inner = E = int(expand * embed_dims)
        self.dt_rank = dt_rank_of(embed_dims, dt_rank)
        self.scan_impl = scan_impl

        self.in_proj = nn.Linear(embed_dims, 2 * E, bias=bias)
        self.conv2d = nn.Conv2d(
            E, E, conv_size, padding=conv_size // 2, groups=E, bias=conv_bias
        )
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(E, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, E, bias=True)
        self.out_proj = nn.Linear(E, embed_dims, bias=bias)
        self.direction_gate = build_direction_gate(direction_gate, 2 * E, 4)

        # Mamba's initialisation, as the official code does it.
        init_dt_proj(self.dt_proj, dt_min, dt_max, dt_scale, dt_init_floor)
        self.A_log = nn.Parameter(s4d_real_log(E, d_state))
        self.D = nn.Parameter(torch.ones(E))
        self.direction_Bs = nn.Parameter(torch.zeros(5, d_state))
        nn.init.trunc_normal_(self.direction_Bs, std=0.02)
        for param in (self.A_log, self.D, self.direction_Bs):
            param._no_weight_decay = True

    def forward(
        self,
        x: Tensor,
        hw_shape: Sequence[int],
        positions: Optional[Tensor] = None,
        gap_mode: Optional[str] = None,
        token_mask: Optional[Tensor] = None,
        cls_index: Union[None, int, Tensor] = None,
        aux: Optional[dict] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Mix tokens.

        Args:
            x (Tensor): (B, K, d) tokens (K = H*W when dense).
            hw_shape (Sequence[int]): The full grid (H, W).
            positions (Tensor, optional): int64 (B, K), the sorted raster
                indices of the K tokens in the H x W grid. None means all
                tokens in raster order. Defaults to None.
            gap_mode (str, optional): How the scan crosses pruned (or
                masked) steps: 'prev' or 'null' (aligned), 'none' (the
                naive compact scan); see :mod:`mmssm.ops`. None: 'prev'
                with ``positions``, 'null' with ``token_mask``.
                Defaults to None.
            token_mask (Tensor, optional): (B, H*W) of {0, 1}, DyVM's
                masked mode (all tokens given, no ``positions``). A masked
                token enters as the pruned path's pruned token, so that the
                output at the kept tokens equals the pruned forward of the
                kept tokens (``positions`` = their indices, same
                ``gap_mode``): its ``in_proj`` x is zeroed before the 2-D
                conv (the pruned path's zeros), its conv output (after
                SiLU) is zeroed as the scans' input ``u``; the step inputs
                still come from the raster token's conv output (the
                released quirk, as in the pruned path), and in each
                direction the steps that scan a masked token get ``B = C =
                0`` and the step size of the gap (:func:`mmssm.ops.
                masked_delta`: ``softplus(2 b_dt)`` for 'null', the last
                kept step's for 'prev', 0, i.e. skipped, for 'none').
                DyVM's rearrangement (kept tokens first) does not apply to
                PlainMamba: its 2-D conv and four zig-zag orders live on
                the grid, and no arrangement of a grid puts the masked
                tokens after every kept one in all four orders; 'none' is
                its non-aligned counterpart (the compact scan of the kept
                tokens, exactly). Defaults to None.
            cls_index (int | Tensor, optional): Where the direction gate
                reads ``x || z`` (PlainMamba has no class token: None, the
                mean over the kept tokens). Defaults to None.
            aux (dict, optional): The backbone's aux channel; with a
                direction gate, its (B, 4) decisions are appended to
                ``aux['direction_gates']``. Defaults to None.

        Returns:
            tuple[Tensor, Tensor]: The output (B, K, d) and the gated SSM
            output ``y * silu(z)`` (B, K, E) before ``out_proj``, ``y`` the
            sum of the four scans mapped back to token order (each times
            its gate bit when gated).
        """
        batch, K, _ = x.shape
        H, W = (int(s) for s in hw_shape)
        L = H * W
        E, N, R = self.d_inner, self.d_state, self.dt_rank
        if positions is None:
            if K != L:
                raise UserError(
                    f'x has {K} tokens but hw_shape {(H, W)} '
                    f'has {L}; pass positions'
                )
        elif tuple(positions.shape) != (batch, K):
            raise UserError(
                f'positions must be (batch={batch}, K={K}), '
                f'got {tuple(positions.shape)}'
            )
        if token_mask is not None:
            if positions is not None:
                raise UserError('token_mask and positions are exclusive')
            if tuple(token_mask.shape) != (batch, L):
                raise UserError(
                    f'token_mask must be (batch={batch}, L={L}), '
                    f'got {tuple(token_mask.shape)}'
                )
        if gap_mode is None:
            gap_mode = 'null' if token_mask is not None else 'prev'

        xz = self.in_proj(x)
        bits = None
        if self.direction_gate is not None:
            bits = self.direction_gate(xz, cls_index, token_mask)
            record_gates(aux, bits)
        x, z = xz.chunk(2, dim=-1)  # (B, K, E) each
        mask = None
        if token_mask is not None:
            mask = token_mask.to(x.dtype)
            x = x * mask[..., None]
        # (the same memory layout in both cases, hence the same rounding)
        # contiguous NCHW: a channels-last input gives the conv weight a
        # gradient of other strides, which DDP copies at every step
        if positions is None:
            grid = x.transpose(1, 2).contiguous()
        else:  # zeros at the pruned positions, in one pass
            index = positions[:, None].expand(-1, E, -1)
            grid = x.new_zeros(batch, E, L)
            grid = grid.scatter(2, index, x.transpose(1, 2))
        grid = grid.view(batch, E, H, W)
        # tokens-major (B, L, E): x_proj's input (it would copy the
        # transposed view itself) and the layout in which the scans load a
        # vector of channels per step (and gather the kept tokens as rows)
        x_conv = self.act(self.conv2d(grid)).flatten(2).transpose(1, 2)
        x_conv = x_conv.contiguous()

        # Per-step inputs of the released model: those of the raster token.
        dbl = self.x_proj(x_conv)  # (B, L, R + 2N)
        x_conv = x_conv.transpose(1, 2)  # (B, E, L) view
        dt, B, C = dbl.split([R, N, N], dim=-1)
        # The bias enters twice: once in dt_proj, once as the scan's
        # delta_bias. Hand it over as 2b in one place so that a zero-input
        # token (gap_mode 'null') has delta = softplus(2b).
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (B, E, L)
        B, C = B.transpose(1, 2), C.transpose(1, 2)  # (B, N, L)

        # A, D and the dt bias in (at least) float32, as the official code
        ssm_dtype = torch.promote_types(x_conv.dtype, torch.float32)
        scan = dict(
            A=-torch.exp(self.A_log.to(ssm_dtype)),
            D=self.D.to(ssm_dtype),
            delta_bias=2 * self.dt_proj.bias.to(ssm_dtype),
            gap_mode=gap_mode,
            bits=bits,
        )
        if mask is not None:
            x_conv = x_conv * mask[:, None]
        if positions is None:
            y = self._scan_in_place(x_conv, dt, B, C, mask, hw_shape, **scan)
        else:
            y = self._scan_kept(x_conv, dt, B, C, positions, hw_shape, **scan)
        y = y.transpose(1, 2) * self.act(z)
        return self.out_proj(y), y

    def _scan_in_place(
        self,
        u: Tensor,
        dt: Tensor,
        B: Tensor,
        C: Tensor,
        mask: Optional[Tensor],
        hw_shape: Sequence[int],
        A: Tensor,
        D: Tensor,
        delta_bias: Tensor,
        gap_mode: str,
        bits: Optional[Tensor],
    ) -> Tensor:
        """The four scans of the full grid (dense, or masked) as index
        patterns: step s of direction d reads ``u`` at token
        ``orders[d, s]`` and writes its output there, and takes the step
        inputs of the raster token s (the released model), so no copy of
        ``u``, ``dt`` or the outputs is gathered. Returns the sum of the
        four scans (B, E, L) in raster order."""
        orders, _, moves = scan_orders(hw_shape, u.device)
        gate_trains = bits is not None and self.direction_gate.training
        y = None
        for d in range(4):
            order = orders[d]
            # direction_Bs row of the move that arrived at each step, added
            # in the (B, L, N) layout of x_proj's output (the kernel's)
            dir_B = self.direction_Bs[moves[d]].to(B.dtype)
            B_d = (B.transpose(1, 2) + dir_B).transpose(1, 2)
            delta, C_d, bias, softplus = dt, C, delta_bias, True
            if mask is not None:  # the steps that scan a masked token
                step_mask = mask[:, order]
                B_d = B_d * step_mask[:, None]
                C_d = C * step_mask[:, None]
                delta = masked_delta(dt, step_mask, gap_mode, bias, True)
                bias, softplus = None, False

            def run(
                index,
                args=(u, delta, B_d, C_d),
                bias=bias,
                sp=softplus,
                o=order,
            ):
                if index is not None:  # the images whose direction runs
                    args = tuple(select_rows(t, index) for t in args)
                return selective_scan(
                    args[0],
                    args[1],
                    A,
                    args[2],
                    args[3],
                    D=D,
                    delta_bias=bias,
                    delta_softplus=sp,
                    impl=self.scan_impl,
                    order=o,
                )

            bits_d = None if bits is None else bits[:, d]
            y = add_gated(y, run, bits_d, gate_trains, u)
        return y

    def _scan_kept(
        self,
        x_conv: Tensor,
        dt: Tensor,
        B: Tensor,
        C: Tensor,
        positions: Tensor,
        hw_shape: Sequence[int],
        A: Tensor,
        D: Tensor,
        delta_bias: Tensor,
        gap_mode: str,
        bits: Optional[Tensor],
    ) -> Tensor:
        """The four scans of the kept tokens (pruned), one per direction as
        in :meth:`_scan_in_place`: step s of direction d scans the kept
        token with the s-th smallest step in d (``order``), whose original
        step is the scan's position, and takes the step inputs of the
        raster token at that step (the released model). The kept tokens'
        inputs are gathered once, the per-step inputs once per direction
        for the images that run it, all tokens-major (the kernel's fast
        layout), and each scan writes its output back in the order of
        ``positions``. Returns the sum of the four scans (B, E, K) in that
        order."""
        batch, K = positions.shape
        L = x_conv.shape[-1]
        _, ranks, moves = scan_orders(hw_shape, x_conv.device)
        # each kept token's step in each direction, sorted, and the slot
        # (in positions) of the kept token scanned at each of them
        steps, slot = ranks[:, positions].sort(dim=-1)  # (4, B, K)
        images = torch.arange(batch, device=positions.device)
        u = _token_rows(x_conv, positions, images).transpose(1, 2)
        # (with all tokens kept there are no gaps: the dense scan)
        aligned = gap_mode != 'none' and K < L
        gate_trains = bits is not None and self.direction_gate.training
        y = None
        for d in range(4):

            def run(index, d=d):
                # the inputs of the images that run only (index None: all),
                # gathered from the raster tensors once
                if index is None:
                    rows, u_d, step, order = images, u, steps[d], slot[d]
                else:
                    rows, step, order = index, steps[d, index], slot[d, index]
                    u_d = _token_rows(x_conv, positions[index], index)
                    u_d = u_d.transpose(1, 2)
                delta, B_d, C_d = (
                    _token_rows(t, step, rows) for t in (dt, B, C)
                )
                # direction_Bs row of the move that arrived at each step
                B_d = B_d + self.direction_Bs[moves[d, step]].to(B.dtype)
                return selective_scan(
                    u_d,
                    delta.transpose(1, 2),
                    A,
                    B_d.transpose(1, 2),
                    C_d.transpose(1, 2),
                    D=D,
                    delta_bias=delta_bias,
                    delta_softplus=True,
                    positions=step if aligned else None,
                    gap_mode=gap_mode,
                    impl=self.scan_impl,
                    order=order,
                )

            bits_d = None if bits is None else bits[:, d]
            y = add_gated(y, run, bits_d, gate_trains, u)
        return y


class PlainMambaLayer(nn.Module):
    """Pre-norm residual block: ``x + drop_path(mixer(norm(x)))``.

    Args:
        embed_dims (int): Token channels.
        mixer_cfg (dict): Keyword arguments of :class:`PlainMambaMixer`.
        drop_path_rate (float): Stochastic depth. Defaults to 0.
        with_dwconv (bool): Append PlainMamba-L1's depthwise block (3x3 DW
            conv + norm + GELU) after the residual add; it replaces the
            tokens, with no residual around it. Defaults to False.
        layer_norm_cfg (dict, optional): Config of the pre-norm; None means
            ``dict(type='LN', eps=1e-5)``. Defaults to None.
        norm_cfg (dict, optional): Config of the depthwise block's norm;
            None means ``dict(type='BN')``. Defaults to None.
    """

    def __init__(
        self,
        embed_dims: int,
        mixer_cfg: dict,
        drop_path_rate: float = 0.0,
        with_dwconv: bool = False,
        layer_norm_cfg: Optional[dict] = None,
        norm_cfg: Optional[dict] = None,
    ) -> None:
        super().__init__()
        layer_norm_cfg = layer_norm_cfg or dict(type='LN', eps=1e-5)
        norm_cfg = norm_cfg or dict(type='BN')
        self.norm = build_norm(layer_norm_cfg, embed_dims)
        self.with_dwconv = with_dwconv
        if with_dwconv:
            self.dw = nn.Sequential(
                nn.Conv2d(
                    embed_dims,
                    embed_dims,
                    3,
                    padding=1,
                    groups=embed_dims,
                    bias=False,
                ),
                build_norm(norm_cfg, embed_dims),
                nn.GELU(),
            )
        self.mamba = PlainMambaMixer(embed_dims, **mixer_cfg)
        self.drop_path = DropPath(drop_path_rate)

    def forward(
        self,
        x: Tensor,
        hw_shape: Sequence[int],
        positions: Optional[Tensor] = None,
        gap_mode: Optional[str] = None,
        token_mask: Optional[Tensor] = None,
        cls_index: Union[None, int, Tensor] = None,
        aux: Optional[dict] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Apply the block; arguments as :meth:`PlainMambaMixer.forward`.

        Returns:
            tuple[Tensor, Tensor]: The tokens (B, K, C) and the mixer's
            gated SSM output (B, K, E), the input of token importance.
        """
        if self.with_dwconv and positions is not None:
            raise UserError(
                'the depthwise block of this layer needs the '
                'full token grid; prune after this layer'
            )
        out, y = self.mamba(
            self.norm(x),
            hw_shape,
            positions,
            gap_mode,
            token_mask=token_mask,
            cls_index=cls_index,
            aux=aux,
        )
        out = x + self.drop_path(out)
        if self.with_dwconv:
            batch, _, C = out.shape
            out = out.transpose(1, 2).reshape(batch, C, *hw_shape)
            out = self.dw(out).flatten(2).transpose(1, 2)
        return out, y


@MODELS.register_module()
class PlainMamba(SSMBackbone):
    """PlainMamba backbone (Yang et al., BMVC 2024).

    A convolutional stem to 1/16 (:class:`ConvPatchEmbed`), a learned
    absolute ``pos_embed`` (no class token), ``num_layers`` x
    :class:`PlainMambaLayer` and a final LayerNorm ``ln1``. Parameter names
    equal those of the official checkpoints (after removing ``backbone.``).

    Inputs of any size work: the stem pads to a multiple of 16 at the bottom
    and right (an H x W image gives a ceil(H/16) x ceil(W/16) grid; 112 x
    137 -> 7 x 9) and ``pos_embed`` is resized bicubically to the grid. A
    checkpoint with a ``pos_embed`` of another (square) size is resized when
    it is loaded.

    Args:
        arch (str | dict): 'l1', 'l2', 'l3' (any case), or a dict with
            the keys of :attr:`arch_zoo`: ``embed_dims``, ``num_layers``,
            ``num_convs`` (3x3 convs of the stem), ``dw_layers`` (layers
            followed by the depthwise block), ``d_state``, ``expand``,
            ``conv_size``. Defaults to 'l1'.
        img_size (int | Sequence[int]): Input size the ``pos_embed`` grid is
            made for. Defaults to 224.
        in_channels (int): Image channels. Defaults to 3.
        out_indices (int | Sequence[int]): Layers whose outputs are
            returned (negative values count from the end). Defaults to -1.
        out_type (str): 'featmap': one (B, C, H/16, W/16) map per index;
            'avg_featmap': one (B, C) vector per index, the normed tokens
            averaged (the official classifier's pooling). The last layer's
            output is normed by ``ln1``, any other by its own LayerNorm
            (``norm_layer{i}``, as the official segmentation backbone).
            Defaults to 'featmap'.
        final_norm (bool): Build ``ln1`` and apply it to the last layer's
            output. The official detection backbone turns it off (its
            adapter norms the features itself). Defaults to True.
        drop_path_rate (float): Stochastic depth of the last layer, linear
            from 0 at the first. Defaults to 0.
        norm_cfg (dict, optional): Config of the batch norms (stem and the
            depthwise block), e.g. ``dict(type='SyncBN')`` for detection;
            None means ``dict(type='BN')``. Defaults to None.
        layer_norm_cfg (dict, optional): Config of each layer's pre-norm;
            None means ``dict(type='LN', eps=1e-5)`` (the official eps).
            Defaults to None.
        out_norm_cfg (dict, optional): Config of ``ln1`` and the per-output
            norms; None means ``dict(type='LN', eps=1e-6)`` (the official
            eps). Defaults to None.
        with_cp (bool): Checkpoint each layer to save memory.
            Defaults to False.
        frozen_stages (int): -1: nothing frozen; 0: the stem and
            ``pos_embed``; k > 0: also the first k layers; ``num_layers``:
            also ``ln1`` and the output norms. Defaults to -1.
        norm_eval (bool): Keep the batch norms in eval mode while training.
            Defaults to False.
        scan_impl (str): ``impl`` of :func:`mmssm.ops.selective_scan` for
            every scan. Defaults to 'auto'.
        prune_cfg (None | str | dict): Token pruning, see
            :func:`~mmssm.models.pruning.build_token_pruner`: None (dense),
            'paper' (the paper's schedule of the arch) or the arguments of
            a :class:`~mmssm.models.pruning.TokenPruner`. The layers of
            ``dw_layers`` need the full grid, so every step must come after
            them. Pruning runs in training and inference; the outputs keep
            the full grid, a pruned token frozen at its value when it was
            pruned. Defaults to None.
        direction_gate (bool | dict): DyVM's direction selection in every
            layer (``direction_gate`` of :class:`PlainMambaMixer`).
            Defaults to False.
        init_cfg (dict | list[dict], optional): Initialisation config. The
            modules initialise themselves as the official code does (Mamba's
            dt/A/D init, trunc-normal ``pos_embed`` and ``direction_Bs``).
            Note that the official ImageNet config initialises the whole
            classifier with ``TruncNormal`` (std 0.02, bias 0) on every
            Linear, which overrides the dt bias init.
            Defaults to None.
    """

    required_keys = (
        'embed_dims',
        'num_layers',
        'num_convs',
        'dw_layers',
        'd_state',
        'expand',
        'conv_size',
    )
    arch_zoo = {
        'l1': {
            'embed_dims': 192,
            'num_layers': 24,
            'num_convs': 1,
            'dw_layers': [0],
            'd_state': 16,
            'expand': 2,
            'conv_size': 7,
        },
        'l2': {
            'embed_dims': 384,
            'num_layers': 24,
            'num_convs': 2,
            'dw_layers': [],
            'd_state': 16,
            'expand': 2,
            'conv_size': 7,
        },
        'l3': {
            'embed_dims': 448,
            'num_layers': 36,
            'num_convs': 2,
            'dw_layers': [],
            'd_state': 16,
            'expand': 2,
            'conv_size': 7,
        },
    }
    out_types = ('featmap', 'avg_featmap')
    family = 'plainmamba'
    scan_convention = 'plainmamba'
    pooled_out_type = 'avg_featmap'
    _out_norm_prefixes = ('ln1', 'norm_layer')

    def __init__(
        self,
        arch: Union[str, dict] = 'l1',
        img_size: Union[int, Sequence[int]] = 224,
        in_channels: int = 3,
        out_indices: Union[int, Sequence[int]] = -1,
        out_type: str = 'featmap',
        final_norm: bool = True,
        drop_path_rate: float = 0.0,
        norm_cfg: Optional[dict] = None,
        layer_norm_cfg: Optional[dict] = None,
        out_norm_cfg: Optional[dict] = None,
        with_cp: bool = False,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        scan_impl: str = 'auto',
        prune_cfg: Union[None, str, dict] = None,
        direction_gate: Union[bool, dict] = False,
        init_cfg: Optional[Union[dict, List[dict]]] = None,
    ) -> None:
        super().__init__(
            arch,
            img_size,
            out_indices,
            out_type,
            final_norm,
            drop_path_rate,
            with_cp,
            frozen_stages,
            norm_eval,
            scan_impl,
            prune_cfg,
            init_cfg=init_cfg,
        )
        norm_cfg = norm_cfg or dict(type='BN')
        layer_norm_cfg = layer_norm_cfg or dict(type='LN', eps=1e-5)
        out_norm_cfg = out_norm_cfg or dict(type='LN', eps=1e-6)
        s = self.arch_settings
        self.patch_embed = ConvPatchEmbed(
            in_channels=in_channels,
            embed_dims=self.embed_dims,
            num_convs=int(s['num_convs']),
            norm_cfg=norm_cfg,
        )
        self.patch_grid = ConvPatchEmbed.out_size(self.img_size)
        self._build_pos_embed()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

        mixer_cfg = dict(
            d_state=int(s['d_state']),
            expand=s['expand'],
            conv_size=int(s['conv_size']),
            scan_impl=scan_impl,
            direction_gate=direction_gate,
        )
        self.layers = ModuleList(
            [
                PlainMambaLayer(
                    self.embed_dims,
                    mixer_cfg,
                    drop_path_rate=self.drop_path_rates[i],
                    with_dwconv=i in self.dense_layers(),
                    layer_norm_cfg=layer_norm_cfg,
                    norm_cfg=norm_cfg,
                )
                for i in range(self.num_layers)
            ]
        )
        if final_norm:
            self.ln1 = build_norm(out_norm_cfg, self.embed_dims)
        for i in self.out_indices:
            if i != self.num_layers - 1:
                self.add_module(
                    f'norm_layer{i}', build_norm(out_norm_cfg, self.embed_dims)
                )
        self._freeze_stages()

    def dense_layers(self) -> Tuple[int, ...]:
        """The layers followed by the depthwise block (``dw_layers``)."""
        layers = tuple(int(i) for i in self.arch_settings['dw_layers'])
        for i in layers:
            if not 0 <= i < self.num_layers:
                raise UserError(
                    f'arch dw_layers must index the {self.num_layers} '
                    f'layers, got {list(layers)}'
                )
        return layers

    # ------------------------------------------------------------- forward
    def embed(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """Stem and position embedding.

        Args:
            x (Tensor): Images (B, C, H, W).

        Returns:
            tuple[Tensor, tuple[int, int]]: Tokens (B, h*w, C) in raster
            order and the grid (h, w).
        """
        x, hw = self.patch_embed(x)
        return x + self.get_pos_embed(hw).to(x.dtype), hw

    def init_tokens(self, x: Tensor) -> TokenState:
        """Embed images into the token state that the layers run on."""
        tokens, hw = self.embed(x)
        return TokenState(tokens, hw, patch_stride=16)

    def layer_kwargs(self, state: TokenState) -> dict:
        """The grid, and the kept tokens' raster positions when pruned."""
        kwargs = dict(hw_shape=tuple(state.hw))
        if state.index is not None:
            kwargs.update(positions=state.index, gap_mode=self.scan_gap_mode())
        return kwargs

    def output(self, state: TokenState, i: int) -> Tensor:
        """The output of layer ``i`` on the full grid.

        Args:
            state (TokenState): The state after layer ``i``.
            i (int): Layer index (0-based).

        Returns:
            Tensor: (B, C, h, w) for 'featmap', (B, C) for 'avg_featmap'.
        """
        x = state.full()
        if i == self.num_layers - 1:
            if self.final_norm:
                x = self.ln1(x)
        else:
            x = getattr(self, f'norm_layer{i}')(x)
        if self.out_type == 'avg_featmap':
            return x.mean(dim=1)
        return x.transpose(1, 2).reshape(x.shape[0], -1, *state.hw)
