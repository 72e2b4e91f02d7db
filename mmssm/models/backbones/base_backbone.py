"""The parts that the plain SSM backbones (PlainMamba, Vim) share."""

import math
from typing import Dict, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmengine.model import BaseModule
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from mmssm.models.layers import (
    TokenState,
    insert_cls_slot,
    resize_pos_embed,
    run_layers,
    split_cls_slot,
)


class SSMBackbone(BaseModule):
    """Base of the non-hierarchical SSM backbones.

    Checks the common arguments, owns ``pos_embed`` (with its resize at load
    and at forward), runs the layer loop and freezes stages; a subclass
    builds the modules and defines how a layer runs on the token state.

    A subclass sets the class attributes below and, in ``__init__``,
    ``embed_dims``, ``num_layers``, ``out_indices``, ``frozen_stages``,
    ``norm_eval``, ``with_cp``, ``pruner``, ``patch_embed``, ``patch_grid``
    (the grid ``pos_embed`` is made for), ``pos_embed`` (with
    :meth:`_build_pos_embed`) and ``layers``. It defines
    :meth:`init_tokens`, :meth:`_run_layer` and :meth:`output`.
    """

    arch_zoo: Dict[str, dict] = {}
    _required_keys: Tuple[str, ...] = ()
    OUT_TYPES: Tuple[str, ...] = ()
    # Parameters of the embedding: layer depth 0, frozen by frozen_stages=0.
    _embed_params = ('pos_embed', 'cls_token')
    # Children (name prefixes) after the last layer, frozen with all layers.
    _out_norm_prefixes: Tuple[str, ...] = ()
    # Whether a checkpoint's pos_embed may hold a class slot at M // 2.
    _ckpt_cls_slot = False
    # Class tokens in the sequence (one at M // 2 in ``pos_embed`` if 1).
    num_extra_tokens = 0

    # ----------------------------------------------------------- arguments
    def _parse_arch(self, arch: Union[str, dict]) -> dict:
        """The settings of a key of :attr:`arch_zoo` (any case) or a dict."""
        if isinstance(arch, str):
            key = arch.lower()
            if key not in self.arch_zoo:
                raise ValueError(
                    f'arch {arch!r} is not one of {sorted(self.arch_zoo)}'
                )
            return dict(self.arch_zoo[key])
        if not isinstance(arch, dict):
            raise TypeError(
                f'arch must be a str or a dict, got {type(arch).__name__}'
            )
        missing = [k for k in self._required_keys if k not in arch]
        if missing:
            raise ValueError(
                f'arch dict is missing the key(s) {missing}; '
                f'it needs {list(self._required_keys)}'
            )
        return dict(arch)

    def _parse_out_indices(
        self, out_indices: Union[int, Sequence[int]]
    ) -> Tuple[int, ...]:
        """Sorted, unique, non-negative layer indices."""
        if isinstance(out_indices, int):
            out_indices = [out_indices]
        if not isinstance(out_indices, Sequence) or not out_indices:
            raise ValueError(
                f'out_indices must be an int or a non-empty '
                f'sequence of ints, got {out_indices!r}'
            )
        result = []
        for index in out_indices:
            i = int(index) + (self.num_layers if int(index) < 0 else 0)
            if not 0 <= i < self.num_layers:
                raise ValueError(
                    f'out_indices {list(out_indices)} has '
                    f'{index}, out of range for '
                    f'{self.num_layers} layers'
                )
            result.append(i)
        return tuple(sorted(set(result)))

    def _check_out_type(self, out_type: str) -> str:
        if out_type not in self.OUT_TYPES:
            raise ValueError(
                f'out_type must be one of {self.OUT_TYPES}, got {out_type!r}'
            )
        return out_type

    def _check_frozen_stages(self, frozen_stages: int) -> int:
        if not -1 <= frozen_stages <= self.num_layers:
            raise ValueError(
                f'frozen_stages must be in [-1, '
                f'{self.num_layers}], got {frozen_stages}'
            )
        return frozen_stages

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

    def _run_layer(
        self, i: int, state: TokenState, return_ssm_out: bool
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Layer ``i`` on the state's tokens (see :func:`run_layers`)."""
        raise NotImplementedError

    def output(self, state: TokenState, i: int) -> Tensor:
        """The output of layer ``i`` (see ``out_type``)."""
        raise NotImplementedError

    def forward_layer(self, i: int, x: Tensor, *args, **kwargs) -> Tensor:
        """Run layer ``i`` (checkpointed if ``with_cp``).

        ``args`` and ``kwargs`` go to the layer's ``forward``.
        """
        layer = self.layers[i]
        if self.with_cp and self.training and x.requires_grad:
            return cp.checkpoint(
                layer, x, *args, use_reentrant=False, **kwargs
            )
        return layer(x, *args, **kwargs)

    def run_layers(
        self, state: TokenState, start: int, end: int
    ) -> TokenState:
        """Run layers ``start`` .. ``end - 1`` on the state.

        A state with ``index`` runs the layers on its kept tokens only, at
        their original positions (aligned or naive, by the pruner's
        ``align`` and ``gap_mode``; the aligned defaults without a pruner).
        The pruning steps scheduled after these layers run here, so any
        grouping of the layers prunes the same way.

        Args:
            state (TokenState): From :meth:`init_tokens` or an earlier call.
            start (int): First layer (0-based).
            end (int): One past the last layer.

        Returns:
            TokenState: The state after layer ``end - 1`` (and its pruning
            step, if one is scheduled there).
        """
        return run_layers(state, start, end, self.pruner, self._run_layer)

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

    def get_layer_depth(
        self, param_name: str, prefix: str = ''
    ) -> Tuple[int, int]:
        """The layer depth of a parameter, for layer-wise lr decay.

        As mmpretrain's ViT: the embedding (``patch_embed``, ``pos_embed``,
        ``cls_token``) is depth 0, layer ``i`` is depth ``i + 1``, anything
        else (the output norms, and parameters outside the backbone such as
        a head) is the last depth ``num_layers + 1``.

        Args:
            param_name (str): The parameter's name.
            prefix (str): The backbone's prefix in ``param_name``, e.g.
                'backbone.'. Defaults to ''.

        Returns:
            tuple[int, int]: The layer depth and the number of depths
            (``num_layers + 2``).
        """
        num_depths = self.num_layers + 2
        if not param_name.startswith(prefix):
            return num_depths - 1, num_depths
        name = param_name[len(prefix) :]
        if name in self._embed_params or name.startswith('patch_embed.'):
            depth = 0
        elif name.startswith('layers.'):
            depth = int(name.split('.')[1]) + 1
        else:
            depth = num_depths - 1
        return depth, num_depths
