"""Vision Mamba (Vim), the dense backbone of hustvl/Vim (ICML 2024).

The model follows the released code (``vim/models_mamba.py`` and the bundled
``mamba-1p1p1/mamba_ssm/modules/mamba_simple.py`` with ``bimamba_type='v2'``)
so that the released checkpoints load after :func:`convert_vim` and give the
same outputs:

* a patch convolution (kernel ``patch_size``, stride ``stride``, no padding);
* a class token inserted at index ``M // 2`` of the ``M`` patch tokens
  *before* ``pos_embed`` is added, so ``pos_embed`` has ``M + 1`` entries
  with the class slot at ``M // 2``;
* ``num_layers`` blocks ``add -> RMSNorm -> bidirectional mixer`` with the
  residual stream kept in float32. The released ``Block`` returns the mixer
  output and the residual separately and adds them at the start of the next
  block (and, after the last block, right before ``norm_f``); that is the
  same computation as the pre-norm stream ``x = x + mixer(norm(x))`` that
  :class:`VimBlock` runs, with the drop path of each mixer output at
  ``linspace(0, drop_path_rate, num_layers)[i]`` as there;
* the "v2" bidirectional mixer :class:`BiMambaV2`.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor

from mmssm.errors import UserError
from mmssm.models.layers import (
    add_gated,
    build_direction_gate,
    build_token_norm,
    dt_rank_of,
    init_dt_proj,
    record_gates,
    s4d_real_log,
    upcast,
)
from mmssm.models.layers.direction_gate import select_rows
from mmssm.models.pruning import TokenState
from mmssm.ops import causal_conv1d as conv1d_op
from mmssm.ops import masked_delta, selective_scan
from mmssm.registry import MODELS

from .base_backbone import SSMBackbone


def causal_conv1d(
    x: Tensor,
    conv: nn.Conv1d,
    positions: Optional[Tensor] = None,
    seq_len: Optional[int] = None,
    activation: Optional[str] = None,
    impl: str = 'auto',
    reverse: bool = False,
) -> Tensor:
    """Depthwise causal convolution, optionally position-aware.

    Runs :func:`mmssm.ops.causal_conv1d` with the weights of ``conv``.

    Args:
        x (Tensor): (B, E, K).
        conv (nn.Conv1d): Depthwise, kernel ``k``; its own padding is unused
            (the input is padded by ``k - 1`` on the left only).
        positions (Tensor, optional): (B, K) int64, the increasing positions
            of the K tokens in a sequence of ``seq_len``. The result is the
            convolution over the full length with zeros at the missing
            positions, read at the K positions. None: convolve the K tokens
            as they are. Defaults to None.
        seq_len (int, optional): The full length. Defaults to None.
        activation (str, optional): None or 'silu', applied to the output.
            Defaults to None.
        impl (str): ``impl`` of :func:`mmssm.ops.causal_conv1d` ('auto',
            'ref' or 'cpu'). Defaults to 'auto'.
        reverse (bool): The anti-causal conv (the backward direction).
            Defaults to False.

    Returns:
        Tensor: (B, E, K), in the layout of ``x``.
    """
    return conv1d_op(
        x,
        conv.weight,
        conv.bias,
        positions,
        seq_len if positions is not None else None,
        activation,
        impl,
        reverse,
    )


def conv_impl_of(scan_impl: str) -> str:
    """The causal conv's ``impl`` for a backbone's ``scan_impl``.

    The PyTorch scans ('ref', 'chunked') pair with the PyTorch conv ('ref');
    'cpu', 'cuda' and 'auto' with 'auto' (the compiled kernel on CPU
    tensors, PyTorch's conv elsewhere).
    """
    return 'ref' if scan_impl in ('ref', 'chunked') else 'auto'


class BiMambaV2(nn.Module):
    """The bidirectional "v2" Mamba mixer of Vim.

    ``in_proj`` (shared) gives ``x`` and the gate ``z``. The forward branch
    runs ``conv1d`` (causal, + SiLU), ``x_proj``, ``dt_proj`` and the
    selective scan with ``A_log``/``D`` on the sequence; the backward branch
    runs ``conv1d_b``, ``x_proj_b``, ``dt_proj_b``, ``A_b_log``/``D_b`` on the
    flipped sequence, with ``z`` flipped too. Each branch is gated by
    ``silu(z)`` inside the scan, and::

        out = out_proj((y_f + flip(y_b)) / 2)

    The ``/ 2`` is the released models' ``if_divide_out=True``. The released
    code flips copies of the sequence; here the backward branch's conv and
    scan run from the last token to the first (``reverse=True`` of the ops),
    which is the same computation without the copies, and all tensors stay
    in the (B, K, .) layout of the Linear layers (the ops read (B, E, K)
    views).

    Token pruning: ``forward`` takes the kept tokens and their sorted
    original positions. Aligned (``gap_mode`` 'prev' or 'null', the
    paper's method) the scan advances the hidden state across the pruned
    tokens (:func:`mmssm.ops.selective_scan` with ``positions``) and the
    causal convolution sees zeros at the pruned positions; with
    ``gap_mode='none'`` (the naive baseline) both run over the compact
    sequence.

    Initialisation as the released code: ``A_log = A_b_log = log(1..N)``,
    ``D = D_b = 1``, ``dt_proj`` weight uniform in ``+-dt_rank**-0.5 *
    dt_scale`` and bias ``softplus^-1(dt)``, ``dt`` log-uniform in
    ``[dt_min, dt_max]`` (floored at ``dt_init_floor``). ``dt_proj_b`` keeps
    PyTorch's default init and its bias is zeroed by the model-level init
    (:meth:`Vim.init_official`), as in the released code.

    Args:
        embed_dims (int): Model width C.
        d_state (int): SSM state size N. Defaults to 16.
        d_conv (int): Causal conv kernel. Defaults to 4.
        expand (int): Inner width E = expand * C. Defaults to 2.
        dt_rank (int | str): Rank of the step projection; 'auto' is
            ``ceil(C / 16)``. Defaults to 'auto'.
        dt_min (float): Defaults to 0.001.
        dt_max (float): Defaults to 0.1.
        dt_scale (float): Defaults to 1.0.
        dt_init_floor (float): Defaults to 1e-4.
        conv_bias (bool): Defaults to True.
        bias (bool): Bias of in_proj/out_proj. Defaults to False.
        scan_impl (str): ``impl`` of :func:`mmssm.ops.selective_scan`; it
            also picks the causal conv's (:func:`conv_impl_of`).
            Defaults to 'auto'.
        direction_gate (bool | dict): Build DyVM's
            :class:`~mmssm.models.layers.DirectionGate` over the two
            directions (a dict: its keyword arguments). In training each
            direction's gated SSM output (after ``silu(z)``) is multiplied
            by its bit, keeping the ``/ 2``; at inference a direction runs
            only on the images whose bit is on, zeros for the others.
            Defaults to False.
    """

    def __init__(
        self,
        embed_dims: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Union[int, str] = 'auto',
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        scan_impl: str = 'auto',
        direction_gate: Union[bool, dict] = False,
    ) -> None:
        super().__init__()
        self.embed_dims = embed_dims
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = int(expand * embed_dims)
        self.dt_rank = dt_rank_of(embed_dims, dt_rank)
        self.scan_impl = scan_impl
        E, N, R = self.d_inner, d_state, self.dt_rank

        self.in_proj = nn.Linear(embed_dims, 2 * E, bias=bias)
        self.conv1d = nn.Conv1d(
            E, E, d_conv, groups=E, padding=d_conv - 1, bias=conv_bias
        )
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        init_dt_proj(self.dt_proj, dt_min, dt_max, dt_scale, dt_init_floor)
        self.A_log = nn.Parameter(s4d_real_log(E, N))
        self.D = nn.Parameter(torch.ones(E))

        self.conv1d_b = nn.Conv1d(
            E, E, d_conv, groups=E, padding=d_conv - 1, bias=conv_bias
        )
        self.x_proj_b = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj_b = nn.Linear(R, E, bias=True)
        self.A_b_log = nn.Parameter(s4d_real_log(E, N))
        self.D_b = nn.Parameter(torch.ones(E))

        self.out_proj = nn.Linear(E, embed_dims, bias=bias)
        self.direction_gate = build_direction_gate(direction_gate, 2 * E, 2)
        for p in (self.A_log, self.A_b_log, self.D, self.D_b):
            p._no_weight_decay = True

    def _branch(
        self,
        x: Tensor,
        z: Tensor,
        conv1d: nn.Conv1d,
        x_proj: nn.Linear,
        dt_proj: nn.Linear,
        A_log: Tensor,
        D: Tensor,
        positions: Optional[Tensor],
        seq_len: int,
        gap_mode: str,
        step_mask: Optional[Tensor] = None,
        reverse: bool = False,
    ) -> Tensor:
        """One scan direction: conv, projections, gated selective scan.

        ``x``, ``z`` (B, E, K) are views of ``in_proj``'s (B, K, 2E)
        output: the ops read them in place, and every tensor stays in the
        (B, K, .) layout of the Linear layers (no transposed copies).
        ``reverse``: the backward direction, the conv and the scan run from
        the last token to the first (no flipped copies). ``step_mask``
        (B, K): the masked mode; ``x`` is already zero at the masked steps,
        the conv output is zeroed there again, so that ``x_proj`` (no bias)
        gives them ``dt = B = C = 0``, and their step sizes follow
        ``gap_mode`` (:func:`mmssm.ops.masked_delta`).
        """
        x = causal_conv1d(
            x,
            conv1d,
            positions,
            seq_len,
            activation='silu',
            impl=conv_impl_of(self.scan_impl),
            reverse=reverse,
        )  # (B, E, K), a view of (B, K, E)
        if step_mask is not None:
            x = x * step_mask[:, None]
        x_dbl = x_proj(x.transpose(1, 2))  # (B, K, R + 2N)
        dt, B, C = torch.split(
            x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1
        )
        A = -torch.exp(upcast(A_log))
        delta_bias, softplus = upcast(dt_proj.bias), True
        # dt_proj (its bias: in the scan) fused into the scan: the kernel
        # projects the (B, R, K) view of x_proj's output per tile
        dt, delta_proj = dt.transpose(1, 2), dt_proj.weight
        if step_mask is not None:  # masked_delta needs the step sizes
            dt = F.linear(dt.transpose(1, 2), delta_proj).transpose(1, 2)
            dt = masked_delta(
                dt, step_mask, gap_mode, delta_bias, True, reverse
            )
            delta_bias, softplus, delta_proj = None, False, None
        return selective_scan(
            x,
            dt,
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            upcast(D),
            z=z,
            delta_bias=delta_bias,
            delta_softplus=softplus,
            positions=positions,
            gap_mode=gap_mode,
            impl=self.scan_impl,
            reverse=reverse,
            delta_proj=delta_proj,
        )

    def forward(
        self,
        x: Tensor,
        positions: Optional[Tensor] = None,
        seq_len: Optional[int] = None,
        gap_mode: Optional[str] = None,
        token_mask: Optional[Tensor] = None,
        cls_index: Union[None, int, Tensor] = None,
        aux: Optional[dict] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Mix a (possibly pruned, or masked) token sequence.

        Args:
            x (Tensor): (B, K, C), the tokens in their original order.
            positions (Tensor, optional): (B, K) or (K, ) int64, the strictly
                increasing original indices of the K tokens in a sequence
                of ``seq_len``. None: the tokens are the whole sequence.
                Defaults to None.
            seq_len (int, optional): Length L of the unpruned sequence;
                defaults to ``positions.max() + 1``. The result does not
                depend on it (a leading gap leaves the zero state unchanged
                and the conv pads with zeros). Defaults to None.
            gap_mode (str, optional): How the scan crosses pruned tokens:
                'prev' or 'null' (aligned: the scan and the conv keep the
                original positions in both directions, the backward one
                scanning them in reverse), or 'none'
                (the naive baseline: both run over the K tokens as a
                shorter sequence). None: 'prev' with ``positions``, 'null'
                with ``token_mask``. Defaults to None.
            token_mask (Tensor, optional): (B, K) of {0, 1}, the masked
                mode of DyVM's training (no ``positions`` then): the x
                branch of ``in_proj`` is zeroed at the masked tokens before
                the causal conv and its output (after SiLU) again after it;
                ``z`` is not masked. A masked token is then a zero-input
                step (``gap_mode`` 'null': its step decays the state by
                ``exp(softplus(b_dt) A)``), so the output at the kept tokens
                equals the aligned 'null' forward of the kept tokens alone
                (tokens in place), and, for tokens rearranged by the caller
                (kept first in original order with the class token at
                ``k // 2``, masked after), the plain forward of the kept
                tokens alone: the masked tokens come after every kept one
                in the forward scan and before them, with a zero state, in
                the backward scan. Defaults to None.
            cls_index (int | Tensor, optional): The class token's index in
                the K tokens (one int, or (B, ) int64 per sample), where the
                direction gate reads ``x || z``; None: the gate pools the
                (kept) tokens. Defaults to None.
            aux (dict, optional): The backbone's aux channel; with a
                direction gate, its (B, 2) decisions are appended to
                ``aux['direction_gates']``. Defaults to None.

        Returns:
            tuple[Tensor, Tensor]: The output (B, K, C) and the gated SSM
            output ``y_f + flip(y_b)`` (B, K, E) in token order, the input
            of the pruning importance score (each direction times its
            gate bit when gated).
        """
        batch, K, _ = x.shape
        if token_mask is not None and positions is not None:
            raise UserError('token_mask and positions are exclusive')
        if gap_mode is None:
            gap_mode = 'null' if token_mask is not None else 'prev'
        if gap_mode == 'none':
            positions = None
        if positions is not None:
            if positions.dim() == 1:
                positions = positions.unsqueeze(0)
            positions = positions.expand(batch, K)
            if seq_len is None:
                seq_len = int(positions.max()) + 1 if K else 0
            # a meta tensor holds no values to check
            elif K and not positions.is_meta:
                last = int(positions.max())
                if last >= seq_len:
                    raise UserError(
                        f'positions reach {last}, beyond seq_len={seq_len}'
                    )
        else:
            seq_len = K

        xz = self.in_proj(x)  # (B, K, 2E)
        bits = None
        if self.direction_gate is not None:
            bits = self.direction_gate(xz, cls_index, token_mask)
            record_gates(aux, bits)
        xs, z = xz.transpose(1, 2).chunk(2, dim=1)  # (B, E, K) views
        mask = None
        if token_mask is not None:
            mask = token_mask.to(xs.dtype)
            xs = xs * mask[:, None]
        params = (
            (self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D),
            (
                self.conv1d_b,
                self.x_proj_b,
                self.dt_proj_b,
                self.A_b_log,
                self.D_b,
            ),
        )
        gate_trains = bits is not None and self.direction_gate.training
        y = None
        for d in range(2):  # forward, then backward (a reversed scan)

            def run(index, d=d):
                u, zd, m, pos = xs, z, mask, positions
                if index is not None:  # the images whose direction runs
                    u, zd, m, pos = (
                        select_rows(t, index) for t in (u, zd, m, pos)
                    )
                return self._branch(
                    u,
                    zd,
                    *params[d],
                    pos,
                    seq_len,
                    gap_mode,
                    m,
                    reverse=d == 1,
                )

            bits_d = None if bits is None else bits[:, d]
            y = add_gated(y, run, bits_d, gate_trains, xs)
        y = y.transpose(1, 2)  # (B, K, E)
        return self.out_proj(y / 2), y


class VimBlock(nn.Module):
    """A Vim layer on the residual stream: ``x + drop_path(mixer(norm(x)))``.

    The stream is kept in float32 (float64 stays float64), as the released
    ``residual_in_fp32=True``.

    Args:
        embed_dims (int): Channels C.
        mixer_cfg (dict): Keyword arguments of :class:`BiMambaV2`.
        norm_cfg (dict, optional): The norm before the mixer; None is
            ``dict(type='RMSNorm', eps=1e-5)``. Defaults to None.
        drop_path_rate (float): Drop path of the mixer output.
            Defaults to 0.
    """

    def __init__(
        self,
        embed_dims: int,
        mixer_cfg: dict,
        norm_cfg: Optional[dict] = None,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        norm_cfg = norm_cfg or dict(type='RMSNorm', eps=1e-5)
        self.norm = build_token_norm(norm_cfg, embed_dims)
        self.mixer = BiMambaV2(embed_dims, **mixer_cfg)
        self.drop_path = DropPath(drop_path_rate)

    def forward(
        self,
        x: Tensor,
        positions: Optional[Tensor] = None,
        seq_len: Optional[int] = None,
        gap_mode: Optional[str] = None,
        token_mask: Optional[Tensor] = None,
        cls_index: Union[None, int, Tensor] = None,
        aux: Optional[dict] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Run the layer; see :meth:`BiMambaV2.forward` for the arguments.

        Returns:
            tuple[Tensor, Tensor]: The stream (B, K, C) and the mixer's SSM
            output.
        """
        x = upcast(x)
        out, y = self.mixer(
            self.norm(x),
            positions,
            seq_len,
            gap_mode,
            token_mask=token_mask,
            cls_index=cls_index,
            aux=aux,
        )
        return x + self.drop_path(out), y


class PatchEmbed(nn.Module):
    """Patch convolution without padding; the input is padded bottom/right.

    Args:
        in_channels (int): Defaults to 3.
        embed_dims (int): Defaults to 192.
        patch_size (int): Conv kernel. Defaults to 16.
        stride (int): Conv stride. Defaults to 16.
    """

    def __init__(
        self,
        in_channels: int = 3,
        embed_dims: int = 192,
        patch_size: int = 16,
        stride: int = 16,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.stride = stride
        self.proj = nn.Conv2d(in_channels, embed_dims, patch_size, stride)

    def grid_size(self, hw: Sequence[int]) -> Tuple[int, int]:
        """Token grid of an (H, W) input (after padding)."""
        p, s = self.patch_size, self.stride
        return tuple(max(-(-(n - p) // s), 0) + 1 for n in hw)  # type: ignore

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        gh, gw = self.grid_size(x.shape[-2:])
        p, s = self.patch_size, self.stride
        pad_h = p + (gh - 1) * s - x.shape[-2]
        pad_w = p + (gw - 1) * s - x.shape[-1]
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (gh, gw)


@MODELS.register_module()
class Vim(SSMBackbone):
    """Vision Mamba (Vim).

    A reimplementation of `Vision Mamba
    <https://arxiv.org/abs/2401.09417>`_ (hustvl/Vim); see the module
    docstring for what is reproduced. Parameter names are those of the
    released checkpoints (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
    ``layers.{i}.norm``, ``layers.{i}.mixer.*``, ``norm_f``).

    Input sizes: the input is zero-padded at the bottom/right so that the
    patch conv covers every pixel, giving a grid of ``ceil((H - patch) /
    stride) + 1`` rows (H/16 for the 16/16 models; 27 at 224 for the
    stride-8 models, as released). ``pos_embed`` belongs to the grid of
    ``img_size``; another grid gets it resized bicubically at forward (the
    class slot kept aside), and checkpoints of another size are resized on
    load (a ``load_state_dict`` pre-hook). The released code does neither:
    its models only take ``img_size``.

    Outputs: ``out_type='featmap'`` gives, for each index in
    ``out_indices`` (in layer order), the token stream after that layer (the
    released Block's residual plus its mixer output, i.e. the input of the
    next block's norm), class token removed, as a (B, C, h, w) map; with
    ``final_norm`` the last layer's map goes through ``norm_f``. The released
    detection backbone taps the same sum (``last_layer_process='add'``); its
    segmentation backbone taps the mixer output alone by default
    (``use_residual_as_feature=False``) and this sum otherwise.
    ``out_type='cls_token'`` gives the (B, C) middle class token at each
    index, through ``norm_f`` at the last layer: with the default
    ``out_indices=-1`` the one feature of the released classifier.

    Args:
        arch (str | dict): A key of :attr:`arch_zoo` ('t'/'tiny',
            's'/'small', 'b'/'base') or a dict with the keys
            ``embed_dims``, ``num_layers``, ``patch_size``, ``stride``,
            ``d_state``, ``expand``, ``d_conv``, ``cls_token``. The
            stride-8 models are ``dict(Vim.arch_zoo['s'], stride=8)``.
            Defaults to 'tiny'.
        img_size (int | tuple[int, int]): The size ``pos_embed`` is built
            for. Defaults to 224.
        in_channels (int): Defaults to 3.
        cls_token (str, optional): 'middle' (a class token at ``M // 2``) or
            None (no class token, the dense-prediction setting); 'arch'
            takes the arch's. Defaults to 'arch'.
        out_indices (int | Sequence[int]): Layers to output; negative
            indices count from the end. Defaults to -1.
        out_type (str): 'featmap' or 'cls_token'. Defaults to 'featmap'.
        final_norm (bool): Build ``norm_f`` and apply it to the last layer's
            output. Defaults to True.
        drop_path_rate (float): Stochastic depth, linear in depth.
            Defaults to 0.
        norm_cfg (dict, optional): Norm of the blocks and ``norm_f``:
            'RMSNorm' (released) or 'LN'; None is
            ``dict(type='RMSNorm', eps=1e-5)`` (the released eps).
            Defaults to None.
        mixer_cfg (dict, optional): Extra keyword arguments of
            :class:`BiMambaV2` (dt init, biases). Defaults to None.
        with_cp (bool): Checkpoint each layer. Defaults to False.
        frozen_stages (int): Freeze the embeddings (0) and also the first
            ``frozen_stages`` layers; ``num_layers`` also freezes ``norm_f``.
            -1 freezes nothing. Defaults to -1.
        norm_eval (bool): Keep batch norms in eval mode while training (Vim
            has none; kept for the common interface). Defaults to False.
        scan_impl (str): ``impl`` of :func:`mmssm.ops.selective_scan`.
            Defaults to 'auto'.
        prune_cfg (None | str | dict): Token pruning, see
            :func:`~mmssm.models.pruning.build_token_pruner`: None (dense),
            'paper' (the paper's schedule of the arch) or the arguments of
            a :class:`~mmssm.models.pruning.TokenPruner` (``align=False``:
            the naive compact scan and causal conv). The class token is
            never pruned and stays in the middle of the kept sequence at its
            original position (half of the kept patch tokens are chosen
            before it, half after). Pruning runs in training and inference;
            the maps keep the full grid, a pruned token frozen at its value
            when it was pruned. Defaults to None.
        direction_gate (bool | dict): DyVM's direction selection in every
            layer (``direction_gate`` of :class:`BiMambaV2`).
            Defaults to False.
        init_cfg (dict | list[dict], optional): Defaults to None, the
            released initialisation (done at construction).
    """

    arch_zoo: Dict[str, dict] = {
        **dict.fromkeys(
            ['t', 'tiny'],
            {
                'embed_dims': 192,
                'num_layers': 24,
                'patch_size': 16,
                'stride': 16,
                'd_state': 16,
                'expand': 2,
                'd_conv': 4,
                'cls_token': 'middle',
            },
        ),
        **dict.fromkeys(
            ['s', 'small'],
            {
                'embed_dims': 384,
                'num_layers': 24,
                'patch_size': 16,
                'stride': 16,
                'd_state': 16,
                'expand': 2,
                'd_conv': 4,
                'cls_token': 'middle',
            },
        ),
        **dict.fromkeys(
            ['b', 'base'],
            {
                'embed_dims': 768,
                'num_layers': 24,
                'patch_size': 16,
                'stride': 16,
                'd_state': 16,
                'expand': 2,
                'd_conv': 4,
                'cls_token': 'middle',
            },
        ),
    }
    required_keys = (
        'embed_dims',
        'num_layers',
        'patch_size',
        'stride',
        'd_state',
        'expand',
        'd_conv',
        'cls_token',
    )
    out_types = ('featmap', 'cls_token')
    family = 'vim'
    scan_convention = 'vim'
    pooled_out_type = 'cls_token'
    CLS_TOKEN_TYPES = ('middle', None)
    _out_norm_prefixes = ('norm_f',)
    _ckpt_cls_slot = True

    def __init__(
        self,
        arch: Union[str, dict] = 'tiny',
        img_size: Union[int, Tuple[int, int]] = 224,
        in_channels: int = 3,
        cls_token: Optional[str] = 'arch',
        out_indices: Union[int, Sequence[int]] = -1,
        out_type: str = 'featmap',
        final_norm: bool = True,
        drop_path_rate: float = 0.0,
        norm_cfg: Optional[dict] = None,
        mixer_cfg: Optional[dict] = None,
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
        s = self.arch_settings
        if cls_token == 'arch':
            cls_token = s['cls_token']
        if cls_token not in self.CLS_TOKEN_TYPES:
            raise UserError(
                f'cls_token must be one of '
                f'{self.CLS_TOKEN_TYPES}, got {cls_token!r}'
            )
        if out_type == 'cls_token' and cls_token is None:
            raise UserError("out_type='cls_token' needs cls_token='middle'")
        self.cls_token_type = cls_token
        self.num_extra_tokens = 0 if cls_token is None else 1
        norm_cfg = norm_cfg or dict(type='RMSNorm', eps=1e-5)

        self.patch_embed = PatchEmbed(
            in_channels, self.embed_dims, s['patch_size'], s['stride']
        )
        self.patch_grid = self.patch_embed.grid_size(self.img_size)
        if cls_token is not None:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embed_dims))
            self.cls_token._no_weight_decay = True
        self._build_pos_embed()

        block_mixer_cfg = dict(
            d_state=s['d_state'],
            d_conv=s['d_conv'],
            expand=s['expand'],
            scan_impl=scan_impl,
            direction_gate=direction_gate,
        )
        block_mixer_cfg.update(mixer_cfg or {})
        self.layers = nn.ModuleList(
            [
                VimBlock(
                    self.embed_dims,
                    block_mixer_cfg,
                    norm_cfg,
                    self.drop_path_rates[i],
                )
                for i in range(self.num_layers)
            ]
        )
        if final_norm:
            self.norm_f = build_token_norm(norm_cfg, self.embed_dims)

        self.init_official()
        self._freeze_stages()

    # ------------------------------------------------------------------
    # Initialisation.
    # ------------------------------------------------------------------
    def init_official(self) -> None:
        """The released initialisation (also run at construction).

        Patch conv: LeCun-normal weight (truncated at 2 std), zero bias;
        ``pos_embed`` and ``cls_token``: truncated normal, std 0.02; linear
        biases zeroed except ``dt_proj.bias`` (so ``dt_proj_b.bias`` starts
        at 0); ``out_proj.weight``: Kaiming-uniform divided by
        ``sqrt(num_layers)``; norms: ones.
        """
        proj = self.patch_embed.proj
        fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
        std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
        nn.init.trunc_normal_(proj.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(proj.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token_type is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for layer in self.layers:
            mixer = layer.mixer
            for m in (
                mixer.in_proj,
                mixer.x_proj,
                mixer.x_proj_b,
                mixer.dt_proj_b,
                mixer.out_proj,
            ):
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            nn.init.kaiming_uniform_(mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                mixer.out_proj.weight /= math.sqrt(self.num_layers)

    # ------------------------------------------------------------------
    # Forward.
    # ------------------------------------------------------------------
    def embed(
        self, x: Tensor
    ) -> Tuple[Tensor, Tuple[int, int], Optional[int]]:
        """Patch tokens, class token and position embedding.

        Returns:
            tuple: The tokens (B, L, C), the grid (h, w) and the index of
            the class token (``M // 2``) or None.
        """
        tokens, grid = self.patch_embed(x)
        B, M, _ = tokens.shape
        cls_index = None
        if self.cls_token_type is not None:
            cls_index = M // 2
            tokens = torch.cat(
                [
                    tokens[:, :cls_index],
                    self.cls_token.expand(B, -1, -1),
                    tokens[:, cls_index:],
                ],
                1,
            )
        return tokens + self.get_pos_embed(grid), grid, cls_index

    def init_tokens(self, x: Tensor) -> TokenState:
        """Embed images into the token state that the layers run on."""
        tokens, grid, cls_index = self.embed(x)
        return TokenState(
            upcast(tokens),
            grid,
            cls_index=cls_index,
            patch_stride=self.patch_embed.stride,
        )

    def layer_kwargs(self, state: TokenState) -> dict:
        """The kept tokens' positions in the full sequence when pruned,
        and the class token's index among the layer's tokens (where the
        direction gates read)."""
        kwargs = {}
        if state.cls_index is not None:
            cls_index = state.cls_index
            if state.index is not None:  # its slot among the kept tokens
                # (found, not counted: a learned pruner's rearranged
                # order is not sorted around the class token)
                cls_index = (state.index == cls_index).int().argmax(-1)
            kwargs.update(cls_index=cls_index)
        if state.index is None:
            return kwargs
        return dict(
            kwargs,
            positions=state.index,
            # a size is a tensor under torch.jit.trace; the ops take ints
            seq_len=int(state.seq_len),
            gap_mode=self.scan_gap_mode(),
        )

    def output(self, state: TokenState, i: int) -> Tensor:
        """The output of layer ``i``: a map on the full grid or the class
        token (see ``out_type``)."""
        x = state.full()
        if i == self.num_layers - 1 and self.final_norm:
            x = self.norm_f(x)
        cls_index = state.cls_index
        if self.out_type == 'cls_token':
            return x[:, cls_index]
        if cls_index is not None:
            x = torch.cat([x[:, :cls_index], x[:, cls_index + 1 :]], 1)
        B, _, C = x.shape
        return x.transpose(1, 2).reshape(B, C, *state.hw).contiguous()
