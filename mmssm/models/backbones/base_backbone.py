"""The parts that the plain SSM backbones (PlainMamba, Vim) share."""

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmengine.model import BaseModule
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from mmssm.errors import UserError
from mmssm.models.layers import (
    insert_cls_slot,
    resize_pos_embed,
    split_cls_slot,
)
from mmssm.models.pruning import TokenState, build_token_pruner, run_layers


def freeze_masked(out: Tensor, x: Tensor, mask: Tensor) -> Tensor:
    """A layer's output where ``mask`` is 1, its input where it is 0.

    Freeze and fill in the masked mode: a masked (pruned) token keeps the
    value it had when it was pruned, as when it is deleted. The values are
    exact; the mask's straight-through gradient passes through the blend.

    Args:
        out (Tensor): (B, L, C) the layer's output.
        x (Tensor): (B, L, C) its input.
        mask (Tensor): (B, L) exact 0/1 values.

    Returns:
        Tensor: (B, L, C).
    """
    m = mask[..., None].to(out.dtype)
    return torch.where(m > 0.5, out, x) + (m - m.detach()) * (out - x)


class SSMBackbone(BaseModule):
    """Base of the non-hierarchical SSM backbones.

    Parses and checks the arguments every backbone has, builds the token
    pruner, owns ``pos_embed`` (with its resize at load and at forward),
    runs the layer loop with its pruning steps and freezes stages. A
    subclass sets the class attributes below; its ``__init__`` calls this
    one, then builds ``patch_embed``, ``patch_grid`` (the grid of
    ``img_size``), ``pos_embed`` (:meth:`_build_pos_embed`), ``layers`` and
    the output norms, and ends with :meth:`_freeze_stages`. It defines
    :meth:`init_tokens`, :meth:`layer_kwargs` and :meth:`output`.

    Args:
        arch (str | dict): A key of :attr:`arch_zoo` or a dict with
            :attr:`required_keys`.
        img_size (int | Sequence[int]): The input size ``pos_embed`` is
            made for.
        out_indices (int | Sequence[int]): Layers whose outputs are
            returned (negative values count from the end).
        out_type (str): One of :attr:`out_types`.
        final_norm (bool): Norm the last layer's output.
        drop_path_rate (float): Stochastic depth of the last layer, linear
            from 0 at the first.
        with_cp (bool): Checkpoint each layer in training.
        frozen_stages (int): -1: nothing frozen; 0: the embedding; k > 0:
            also the first k layers; ``num_layers``: also the output norms.
        norm_eval (bool): Keep batch norms in eval mode while training.
        scan_impl (str): ``impl`` of :func:`mmssm.ops.selective_scan`.
        prune_cfg (None | str | dict): Token pruning, see
            :func:`~mmssm.models.pruning.build_token_pruner`. None: dense.
        init_cfg (dict | list[dict], optional): Initialisation config.
    """

    arch_zoo: Dict[str, dict] = {}
    required_keys: Tuple[str, ...] = ()
    out_types: Tuple[str, ...] = ()
    #: The family of the paper's pruning schedules (``prune_cfg='paper'``).
    family = ''
    #: How :mod:`mmssm.utils.flops` counts a scan of this family.
    scan_convention = ''
    #: The ``out_type`` of one pooled vector per image (classification).
    pooled_out_type = ''
    # Parameters of the embedding: frozen by frozen_stages=0.
    _embed_params = ('pos_embed', 'cls_token')
    # Children (name prefixes) after the last layer, frozen with all layers.
    _out_norm_prefixes: Tuple[str, ...] = ()
    # Whether a checkpoint's pos_embed may hold a class slot at M // 2.
    _ckpt_cls_slot = False
    # Class tokens in the sequence (one at M // 2 in ``pos_embed`` if 1).
    num_extra_tokens = 0
    #: How each family runs DyVM's ``align=False`` in the masked (training)
    #: mode: True permutes the tokens, kept first (Vim's 1-D scans and
    #: causal conv); False leaves them in place and the mixers skip the
    #: masked steps (``gap_mode='none'``; PlainMamba, whose 2-D conv and
    #: four grid orders no single permutation serves). Keyed by family so
    #: that the family files need no change.
    MASKED_REARRANGE = {'vim': True, 'plainmamba': False}

    def __init__(
        self,
        arch: Union[str, dict],
        img_size: Union[int, Sequence[int]],
        out_indices: Union[int, Sequence[int]],
        out_type: str,
        final_norm: bool,
        drop_path_rate: float,
        with_cp: bool,
        frozen_stages: int,
        norm_eval: bool,
        scan_impl: str,
        prune_cfg: Union[None, str, dict],
        init_cfg: Optional[Union[dict, List[dict]]] = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        self.arch_settings = self._parse_arch(arch)
        self.embed_dims = int(self.arch_settings['embed_dims'])
        self.num_layers = int(self.arch_settings['num_layers'])
        if out_type not in self.out_types:
            raise UserError(
                f'out_type must be one of {self.out_types}, got {out_type!r}'
            )
        self.out_type = out_type
        self.out_indices = self._parse_out_indices(out_indices)
        if not -1 <= frozen_stages <= self.num_layers:
            raise UserError(
                f'frozen_stages must be in [-1, {self.num_layers}], got '
                f'{frozen_stages}'
            )
        self.frozen_stages = frozen_stages
        if not 0 <= drop_path_rate < 1:
            raise UserError(
                f'drop_path_rate must be in [0, 1), got {drop_path_rate}'
            )
        n = self.num_layers
        self.drop_path_rates = [
            drop_path_rate * i / max(n - 1, 1) for i in range(n)
        ]
        self.final_norm = final_norm
        self.with_cp = with_cp
        self.norm_eval = norm_eval
        self.scan_impl = scan_impl
        if isinstance(img_size, int):
            img_size = (img_size, img_size)
        self.img_size = tuple(int(v) for v in img_size)
        self.pruner = build_token_pruner(
            prune_cfg,
            self.num_layers,
            family=self.family,
            arch=arch if isinstance(arch, str) else None,
            dense_layers=self.dense_layers(),
            embed_dims=self.embed_dims,
        )
        if self.pruner is not None and hasattr(self.pruner, 'rearrange'):
            rearrange = self.MASKED_REARRANGE.get(self.family, True)
            self.pruner.rearrange = rearrange
        #: What the layers and the pruner reported in the last run of the
        #: layers (``token_decisions``, ``direction_gates``; see
        #: ``TokenState.aux``), whoever drove it (``forward``, the adapter).
        self.aux_outputs: dict = {}
        #: The token state after the last layer of the last run.
        self.final_state: Optional[TokenState] = None

    # ----------------------------------------------------------- arguments
    def _parse_arch(self, arch: Union[str, dict]) -> dict:
        """The settings of a key of :attr:`arch_zoo` (any case) or a dict."""
        if isinstance(arch, str):
            key = arch.lower()
            if key not in self.arch_zoo:
                raise UserError(
                    f'arch {arch!r} is not one of {sorted(self.arch_zoo)}'
                )
            return dict(self.arch_zoo[key])
        if not isinstance(arch, dict):
            raise UserError(
                f'arch must be a str or a dict, got {type(arch).__name__}'
            )
        missing = [k for k in self.required_keys if k not in arch]
        if missing:
            raise UserError(
                f'arch dict is missing the key(s) {missing}; '
                f'it needs {list(self.required_keys)}'
            )
        return dict(arch)

    def _parse_out_indices(
        self, out_indices: Union[int, Sequence[int]]
    ) -> Tuple[int, ...]:
        """Sorted, unique, non-negative layer indices."""
        if isinstance(out_indices, int):
            out_indices = [out_indices]
        if not isinstance(out_indices, Sequence) or not out_indices:
            raise UserError(
                f'out_indices must be an int or a non-empty '
                f'sequence of ints, got {out_indices!r}'
            )
        result = []
        for index in out_indices:
            i = int(index) + (self.num_layers if int(index) < 0 else 0)
            if not 0 <= i < self.num_layers:
                raise UserError(
                    f'out_indices {list(out_indices)} has '
                    f'{index}, out of range for '
                    f'{self.num_layers} layers'
                )
            result.append(i)
        return tuple(sorted(set(result)))

    def dense_layers(self) -> Tuple[int, ...]:
        """0-based layers that need the full token grid (no pruning before
        them); none by default."""
        return ()

    # ------------------------------------------------------- pos embedding
    def _build_pos_embed(self) -> None:
        """Make ``pos_embed`` (zeros) for ``patch_grid`` and its load hook.

        The hook is a load pre-hook so that every load path (``init_cfg``,
        ``load_from``, ``load_state_dict``) resizes a checkpoint's grid.
        """
        num_tokens = self.patch_grid[0] * self.patch_grid[1]
        self.pos_embed = nn.Parameter(
            torch.zeros(1, num_tokens + self.num_extra_tokens, self.embed_dims)
        )
        self.pos_embed._no_weight_decay = True
        self._register_load_state_dict_pre_hook(self._prepare_pos_embed)

    def get_pos_embed(self, grid: Sequence[int]) -> Tensor:
        """``pos_embed`` resized to a token grid (class slot at ``M // 2``).

        Args:
            grid (Sequence[int]): The token grid (h, w).

        Returns:
            Tensor: (1, h * w + num_extra_tokens, C).
        """
        if tuple(grid) == tuple(self.patch_grid):
            return self.pos_embed
        cls_slot, grid_pe = split_cls_slot(
            self.pos_embed, self.num_extra_tokens > 0
        )
        grid_pe = resize_pos_embed(grid_pe, self.patch_grid, grid)
        return insert_cls_slot(grid_pe, cls_slot)

    def _prepare_pos_embed(
        self, state_dict: dict, prefix: str, *args, **kwargs
    ) -> None:
        """Load pre-hook: fit a checkpoint's ``pos_embed`` to this model.

        A square checkpoint grid is resized bicubically to ``patch_grid``.
        With ``_ckpt_cls_slot`` the checkpoint may also hold a class slot
        at ``M // 2``: it is kept aside and put back, or dropped if this
        model has no class token. A checkpoint of another rank or width is
        left to ``load_state_dict`` to report, as any other parameter.
        """
        name = prefix + 'pos_embed'
        if name not in state_dict:
            return
        ckpt = state_dict[name]
        if tuple(ckpt.shape) == tuple(self.pos_embed.shape):
            return
        if ckpt.dim() != 3 or ckpt.shape[-1] != self.embed_dims:
            return
        n = ckpt.shape[1]
        with_cls = (
            self._ckpt_cls_slot and n > 1 and math.isqrt(n - 1) ** 2 == n - 1
        )
        side = math.isqrt(n - int(with_cls))
        if side * side != n - int(with_cls):
            raise ValueError(
                f'{name} of the checkpoint has {n} entries: not a square '
                f'grid, so it cannot be resized to the grid {self.patch_grid}'
            )
        cls_slot, grid_pe = split_cls_slot(ckpt, with_cls)
        grid_pe = resize_pos_embed(grid_pe, (side, side), self.patch_grid)
        if not self.num_extra_tokens:
            cls_slot = None
        state_dict[name] = insert_cls_slot(grid_pe, cls_slot)

    # ------------------------------------------------------------- forward
    def init_tokens(self, x: Tensor) -> TokenState:
        """Embed images into the token state that the layers run on."""
        raise NotImplementedError

    def layer_kwargs(self, state: TokenState) -> dict:
        """Keyword arguments of every layer for the state: where its kept
        tokens sit and how the scan crosses the pruned ones.

        The family's part; :meth:`run_layer` adds the generic one: ``aux``
        (the forward's aux channel) always, ``token_mask`` and
        ``gap_mode`` in the masked mode (calling this with the state's
        ``index`` and mask removed: the full sequence, no positions), and
        the class token's per-image slot as ``cls_index`` when the family
        passes one."""
        raise NotImplementedError

    def output(self, state: TokenState, i: int) -> Tensor:
        """The output of layer ``i`` (see ``out_type``)."""
        raise NotImplementedError

    def run_layer(self, i: int, state: TokenState) -> Tuple[Tensor, Tensor]:
        """Layer ``i`` on the state's tokens (checkpointed if ``with_cp``).

        Returns:
            tuple[Tensor, Tensor]: The new tokens and the layer's gated SSM
            output, summed over its scan directions in token order.
        """
        layer = self.layers[i]
        x = state.tokens
        mask = state.token_mask
        if mask is None:
            kwargs = self.layer_kwargs(state)
        else:
            # masked mode: the full sequence (maybe permuted), no positions
            kwargs = self.layer_kwargs(
                dataclasses.replace(state, index=None, token_mask=None)
            )
            kwargs.update(token_mask=mask, gap_mode=self.scan_gap_mode())
        if 'cls_index' in kwargs:
            # the class token's slot per image: a learned pruner moves it
            kwargs['cls_index'] = state.cls_slots()
        # the direction gates report into the forward's aux channel
        kwargs['aux'] = state.aux
        if self.with_cp and self.training and x.requires_grad:
            out, y = cp.checkpoint(layer, x, use_reentrant=False, **kwargs)
        else:
            out, y = layer(x, **kwargs)
        if mask is not None:
            out = freeze_masked(out, x, mask)
        return out, y

    def run_layers(
        self, state: TokenState, start: int, end: int
    ) -> TokenState:
        """Run layers ``start`` .. ``end - 1`` on the state.

        A pruned state runs the layers on its kept tokens only, at their
        original positions (aligned or naive, by the pruner). The pruning
        steps scheduled after these layers run here, so any grouping of
        the layers prunes the same way.

        Args:
            state (TokenState): From :meth:`init_tokens` or an earlier call.
            start (int): First layer (0-based).
            end (int): One past the last layer.

        Returns:
            TokenState: The state after layer ``end - 1`` (and its pruning
            step, if one is scheduled there).
        """
        # any driver of the layers (forward, the adapter) records its run
        self.aux_outputs = state.aux
        if state.token_mask is not None and state.frozen is not None:
            # a driver changed the tokens since the last run (the adapter's
            # injector): masked tokens keep their values, as deleted ones
            tokens = freeze_masked(
                state.tokens, state.frozen, state.token_mask
            )
            state = dataclasses.replace(state, tokens=tokens)
        state = run_layers(state, start, end, self.pruner, self.run_layer)
        if state.token_mask is not None:
            state = dataclasses.replace(state, frozen=state.tokens)
        if end == self.num_layers:
            self.final_state = state
        return state

    def scan_gap_mode(self) -> str:
        """How the layers scan a pruned state: the pruner's choice, or
        aligned with 'prev' for a state pruned without a pruner."""
        return 'prev' if self.pruner is None else self.pruner.scan_gap_mode

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Extract features.

        Args:
            x (Tensor): Images (B, C, H, W), any H and W.

        Returns:
            tuple[Tensor]: One output per ``out_indices`` (see ``out_type``).
        """
        state = self.init_tokens(x)
        outs = []
        for i in range(self.num_layers):
            state = self.run_layers(state, i, i + 1)
            if i in self.out_indices:
                outs.append(self.output(state, i))
        return tuple(outs)

    def final_tokens(self, state: TokenState) -> Tensor:
        """The last layer's tokens on the full sequence, through the final
        norm (``_out_norm_prefixes[0]`` with ``final_norm``), class token
        included: (B, L, C) in the original order."""
        x = state.full()
        name = self._out_norm_prefixes[0] if self._out_norm_prefixes else ''
        norm = getattr(self, name, None) if self.final_norm else None
        return x if norm is None else norm(x)

    # ------------------------------------------------------------ training
    def _freeze_stages(self) -> None:
        """Freeze the embedding (``frozen_stages >= 0``), the first
        ``frozen_stages`` layers and, with all layers, the output norms."""
        if self.frozen_stages < 0:
            return
        for name in self._embed_params:
            param = getattr(self, name, None)
            if param is not None:
                param.requires_grad = False
        modules = [self.patch_embed]
        modules += list(self.layers[: self.frozen_stages])
        if self.frozen_stages == self.num_layers:
            modules += [
                m
                for name, m in self.named_children()
                if name.startswith(self._out_norm_prefixes)
            ]
        for m in modules:
            m.eval()
            for param in m.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'SSMBackbone':
        """Set the mode, keeping frozen stages and (if ``norm_eval``) the
        batch norms in eval mode."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self
