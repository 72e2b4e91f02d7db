"""The token pruner of "Exploring Token Pruning in Vision State Space
Models" (NeurIPS 2024): after scheduled layers, each image keeps its
highest-scored tokens in their original order, and the layers that follow
scan them at their original positions (the alignment, done by the layers
from the kept tokens' positions). The method is in ``docs/method.md``.
"""

import dataclasses
import math
from collections import OrderedDict
from numbers import Integral, Real
from typing import Callable, Iterable, Optional, Sequence, Tuple, Union

import torch
from mmengine.model import BaseModule
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from mmssm.errors import UserError
from mmssm.registry import MODELS

from .schedules import paper_schedule
from .scorers import build_scorer
from .token_state import TokenState

#: How the aligned scan crosses the pruned tokens (``gap_mode``).
ALIGN_GAP_MODES = ('prev', 'null')

#: ``hook(pruner, step, before, after, scores)``: see
#: :meth:`TokenPruner.register_step_hook`.
StepHook = Callable[['TokenPruner', int, TokenState, TokenState, Tensor], None]


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


@MODELS.register_module()
class TokenPruner(BaseModule):
    """A token-pruning schedule and the pruning step.

    Args:
        layers (Sequence[int]): Prune after these layers, 1-based as in the
            paper ("after the k-th layer"), strictly increasing, each in
            ``[1, num_layers - 1]``.
        keep_ratios (float | Sequence[float]): The fraction of the tokens
            entering each step that is kept, each in (0, 1]; one number is
            used at every step. A step that enters with K prunable tokens
            keeps ``floor(ratio * K)`` (the product rounded to 6 decimals
            first, so that 0.7 * 10 keeps 7); keeping none is an error.
        num_layers (int): Layers of the backbone (the backbone sets it).
        scorer (str | dict): A registered scorer (``mmssm.registry.
            TOKEN_SCORERS``): 'clip' (the paper's), 'l1', 'l2', 'raw',
            'random', 'given', or a config dict. Defaults to 'clip'.
        align (bool): Scan the kept tokens at their original positions (the
            paper's method); False is the naive baseline that scans them as
            a shorter sequence. Defaults to True.
        gap_mode (str): How the aligned scan crosses the pruned tokens:
            'prev' (repeat the previous kept token's transition) or 'null'
            (a zero-input token). Unused when ``align=False``.
            Defaults to 'prev'.
        dense_layers (Iterable[int]): 0-based layers that need the full
            token grid (PlainMamba-L1's depthwise block after layer 0):
            every step must come after them. Defaults to ().
        init_cfg (dict, optional): Defaults to None.

    Class token: a state with ``cls_index`` (Vim's middle class token)
    never loses it, and it stays in the middle of the kept sequence: the
    ratio applies to the patch tokens, ``k // 2`` are kept among those
    before the class token and ``k - k // 2`` among those after it.
    """

    def __init__(
        self,
        layers: Sequence[int],
        keep_ratios: Union[float, Sequence[float]],
        num_layers: int,
        scorer: Union[str, dict] = 'clip',
        align: bool = True,
        gap_mode: str = 'prev',
        dense_layers: Iterable[int] = (),
        init_cfg: Optional[dict] = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        self.num_layers = int(num_layers)
        self.layers = self._check_layers(layers, tuple(dense_layers))
        self.keep_ratios = self._check_ratios(keep_ratios, len(self.layers))
        if not isinstance(align, bool):
            raise UserError(
                f'prune_cfg align must be True or False, got {align!r}'
            )
        if gap_mode not in ALIGN_GAP_MODES:
            raise UserError(
                f'prune_cfg gap_mode must be one of {ALIGN_GAP_MODES} (how '
                f'the aligned scan crosses pruned tokens; align=False turns '
                f'alignment off), got {gap_mode!r}'
            )
        self.align = align
        self.gap_mode = gap_mode
        self.scorer = build_scorer(scorer)
        self.scorer_cfg = scorer
        # 0-based layer after which a step runs -> step
        self._steps = {k - 1: s for s, k in enumerate(self.layers)}
        self._step_hooks: OrderedDict[int, StepHook] = OrderedDict()

    # ------------------------------------------------------------ checking
    def _check_layers(
        self, layers: Sequence[int], dense_layers: Tuple[int, ...]
    ) -> Tuple[int, ...]:
        if isinstance(layers, (str, bytes)) or not isinstance(
            layers, Sequence
        ):
            raise UserError(
                f'prune_cfg layers must be a sequence of ints, got {layers!r}'
            )
        if not all(_is_int(k) for k in layers):
            raise UserError(
                f'prune_cfg layers must be ints (1-based: prune after the '
                f'k-th layer), got {list(layers)}'
            )
        layers = tuple(int(k) for k in layers)
        if dense_layers:
            last = max(dense_layers)
            early = [k for k in layers if k <= last]
            if early:
                raise UserError(
                    f'prune_cfg layers {list(layers)}: pruning after layer '
                    f'{early[0]} (1-based) comes before the depthwise block '
                    f'of layer index {last}, which needs the full token '
                    f'grid; prune after layer {last + 1} or later'
                )
        for k in layers:
            if not 1 <= k <= self.num_layers - 1:
                raise UserError(
                    f'prune_cfg layers {list(layers)} has {k}, out of '
                    f'range: a step after the k-th layer needs 1 <= k <= '
                    f'{self.num_layers - 1} ({self.num_layers} layers)'
                )
        if any(b <= a for a, b in zip(layers[:-1], layers[1:])):
            raise UserError(
                f'prune_cfg layers must be strictly increasing (sorted, no '
                f'duplicates), got {list(layers)}'
            )
        return layers

    @staticmethod
    def _check_ratios(
        keep_ratios: Union[float, Sequence[float]], num_steps: int
    ) -> Tuple[float, ...]:
        if _is_real(keep_ratios):
            keep_ratios = (keep_ratios,) * num_steps
        if isinstance(keep_ratios, (str, bytes)) or not isinstance(
            keep_ratios, Sequence
        ):
            raise UserError(
                f'prune_cfg keep_ratios must be a number or a sequence of '
                f'numbers, got {keep_ratios!r}'
            )
        if len(keep_ratios) != num_steps:
            raise UserError(
                f'prune_cfg keep_ratios {list(keep_ratios)} must have one '
                f'ratio per layer of layers ({num_steps})'
            )
        for r in keep_ratios:
            if not _is_real(r) or not 0 < r <= 1:
                raise UserError(
                    f'prune_cfg keep_ratios must be in (0, 1], got '
                    f'{list(keep_ratios)}'
                )
        return tuple(float(r) for r in keep_ratios)

    def extra_repr(self) -> str:
        return (
            f'layers={self.layers}, keep_ratios={self.keep_ratios}, '
            f'align={self.align}, gap_mode={self.gap_mode!r}'
        )

    # ------------------------------------------------------------- running
    @property
    def scan_gap_mode(self) -> str:
        """The ``gap_mode`` the layers scan a pruned state with: the
        pruner's when aligned, 'none' (a compact scan) when naive."""
        return self.gap_mode if self.align else 'none'

    def step_after(self, layer: int) -> Optional[int]:
        """The step that runs after the 0-based ``layer``, or None."""
        return self._steps.get(layer)

    def num_keep(self, step: int, num_tokens: Union[int, Tensor]) -> int:
        """Tokens kept by ``step`` of the ``num_tokens`` prunable ones
        entering it: ``floor(ratio * num_tokens)``, an error if 0.

        ``num_tokens`` may be a 0-d tensor: under ``torch.jit.trace`` (as
        mmengine's FLOP counter runs a model) sizes are tensors.
        """
        ratio = self.keep_ratios[step]
        num_tokens = int(num_tokens)
        k = math.floor(round(ratio * num_tokens, 6))
        if k < 1:
            raise UserError(
                f'prune_cfg keep_ratios[{step}] = {ratio} keeps no token of '
                f'the {num_tokens} entering the step after layer '
                f'{self.layers[step]}; use a larger ratio or a larger input'
            )
        return k

    def select(
        self, scores: Tensor, step: int, cls_slot: Optional[int] = None
    ) -> Optional[Tensor]:
        """The slots of the kept tokens, per image, in their order.

        Args:
            scores (Tensor): (B, K) scores of the tokens entering.
            step (int): Index of the step in the schedule.
            cls_slot (int, optional): Slot of a class token that is never
                pruned and stays in the middle: ``(K - 1) // 2``, where
                every earlier step has put it. Defaults to None.

        Returns:
            Tensor | None: int64 (B, k) increasing slots in ``0 .. K - 1``,
            or None when every token is kept.
        """
        K = int(scores.shape[1])  # a tensor under torch.jit.trace
        if cls_slot is None:
            k = self.num_keep(step, K)
            if k == K:
                return None
            return scores.topk(k, dim=1).indices.sort(dim=1).values
        k = self.num_keep(step, K - 1)
        if k == K - 1:
            return None
        k_before = k // 2
        before = scores[:, :cls_slot].topk(k_before, dim=1).indices
        after = scores[:, cls_slot + 1 :].topk(k - k_before, dim=1).indices
        cls = before.new_full((scores.shape[0], 1), cls_slot)
        return torch.cat(
            [
                before.sort(dim=1).values,
                cls,
                after.sort(dim=1).values + cls_slot + 1,
            ],
            dim=1,
        )

    def prune(
        self, state: TokenState, ssm_out: Tensor, step: int
    ) -> TokenState:
        """Run pruning step ``step`` on the state after its layer.

        Pruned tokens are frozen: the new ``frozen`` is the full sequence
        as it is now, so every pruned token keeps its value at the layer
        that pruned it. The kept tokens are gathered, which passes their
        gradients. Step hooks run after the step.

        Args:
            state (TokenState): The state after the step's layer.
            ssm_out (Tensor): (B, K, E) that layer's gated SSM output.
            step (int): Index of the step in the schedule.

        Returns:
            TokenState: The pruned state (the same state when the step keeps
            every token).
        """
        scores = self.scorer(state, ssm_out, step)
        K, C = (int(n) for n in state.tokens.shape[1:])  # see num_keep
        cls_slot = None if state.cls_index is None else (K - 1) // 2
        slots = self.select(scores, step, cls_slot)
        after = state
        if slots is not None:
            index = (
                slots if state.index is None else state.index.gather(1, slots)
            )
            tokens = state.tokens.gather(1, slots[..., None].expand(-1, -1, C))
            after = dataclasses.replace(
                state, tokens=tokens, index=index, frozen=state.full()
            )
        for hook in self._step_hooks.values():
            hook(self, step, state, after, scores)
        return after

    def register_step_hook(self, hook: StepHook) -> RemovableHandle:
        """Observe every pruning step (tools: kept-token maps, statistics).

        ``hook(pruner, step, before, after, scores)`` is called after each
        step with the states before and after it and the (B, K) scores of
        the tokens that entered; it must not change them.

        Returns:
            RemovableHandle: ``handle.remove()`` removes the hook.
        """
        handle = RemovableHandle(self._step_hooks)
        self._step_hooks[handle.id] = hook
        return handle


#: The keys of a ``prune_cfg`` dict, besides ``type``.
PRUNE_CFG_KEYS = (
    'layers',
    'keep_ratios',
    'scorer',
    'align',
    'gap_mode',
    'schedule',
)


def build_token_pruner(
    prune_cfg: Union[None, str, dict],
    num_layers: int,
    family: str,
    arch: Optional[str],
    dense_layers: Iterable[int] = (),
    embed_dims: Optional[int] = None,
) -> Optional[TokenPruner]:
    """The pruner of a backbone from its ``prune_cfg``.

    Args:
        prune_cfg (None | str | dict): None: no pruning. 'paper': the
            paper's schedule of the backbone's arch (:mod:`.schedules`).
            'dyvm': DyVM's learned pruning with its schedule
            (``dict(type='mmssm.LearnedTokenPruner', schedule='dyvm')``). A
            dict: the arguments of the pruner type (``type``, default
            ``'mmssm.TokenPruner'``); ``schedule='paper'`` (or 'dyvm')
            takes ``layers`` and ``keep_ratios`` from that schedule (e.g.
            ``dict(schedule='paper', align=False)``, the naive baseline).
        num_layers (int): Layers of the backbone.
        family (str): The backbone's family, for the paper's schedules.
        arch (str, optional): The backbone's arch name (None: a dict).
        dense_layers (Iterable[int]): See :class:`TokenPruner`.
        embed_dims (int, optional): Token channels, for a pruner type that
            takes them (a learned pruner's predictor). Defaults to None.

    Returns:
        TokenPruner | None: None for no pruning.
    """
    if prune_cfg is None:
        return None
    if prune_cfg == 'paper':
        prune_cfg = dict(schedule='paper')
    if prune_cfg == 'dyvm':
        prune_cfg = dict(type='mmssm.LearnedTokenPruner', schedule='dyvm')
    if not isinstance(prune_cfg, dict):
        raise UserError(
            f"prune_cfg must be None, 'paper' or a dict, got {prune_cfg!r}"
        )
    cfg = dict(prune_cfg)
    cfg.setdefault('type', 'mmssm.TokenPruner')
    if MODELS.get(cfg['type']) is TokenPruner:
        unknown = sorted(set(cfg) - set(PRUNE_CFG_KEYS) - {'type'})
        if unknown:
            raise UserError(
                f'prune_cfg has unknown key(s) {unknown}; the keys are '
                f'{list(PRUNE_CFG_KEYS)}'
            )
    pruner_type = MODELS.get(cfg['type'])
    if pruner_type is None:
        raise UserError(
            f'prune_cfg type {cfg["type"]!r} is not a registered model'
        )
    schedule = cfg.pop('schedule', None)
    if schedule is not None:
        if schedule not in ('paper', 'dyvm'):
            raise UserError(
                f"prune_cfg schedule must be 'paper' or 'dyvm', got "
                f'{schedule!r}'
            )
        given = [k for k in ('layers', 'keep_ratios') if k in cfg]
        if given:
            raise UserError(
                f'prune_cfg with schedule={schedule!r} takes its layers and '
                f'keep_ratios from the paper; do not give {given}'
            )
        cfg.update(paper_schedule(family, arch, schedule))
    if getattr(pruner_type, 'takes_embed_dims', False):
        cfg.setdefault('embed_dims', embed_dims)
    missing = [k for k in ('layers', 'keep_ratios') if k not in cfg]
    if missing:
        raise UserError(f'prune_cfg is missing {missing}')
    cfg.update(num_layers=num_layers, dense_layers=tuple(dense_layers))
    return MODELS.build(cfg)


#: ``layer_fn(i, state)`` runs layer ``i`` on ``state.tokens`` and returns
#: the new tokens and the layer's gated SSM output.
LayerFn = Callable[[int, TokenState], Tuple[Tensor, Tensor]]


def run_layers(
    state: TokenState,
    start: int,
    end: int,
    pruner: Optional[TokenPruner],
    layer_fn: LayerFn,
) -> TokenState:
    """Run layers ``start`` .. ``end - 1`` and the pruning steps among them.

    After each layer that the schedule prunes after, the pruner ranks the
    tokens and drops the least important ones; any grouping of the layers
    (the adapter's interaction groups) prunes the same way.

    Args:
        state (TokenState): The state before layer ``start``.
        start (int): First layer (0-based).
        end (int): One past the last layer.
        pruner (TokenPruner, optional): The schedule; None: no pruning.
        layer_fn (Callable): ``layer_fn(i, state)`` runs layer ``i`` and
            returns its tokens and its SSM output (B, K, E).

    Returns:
        TokenState: The state after layer ``end - 1`` and its step.
    """
    for i in range(start, end):
        tokens, ssm_out = layer_fn(i, state)
        state = dataclasses.replace(state, tokens=tokens)
        step = None if pruner is None else pruner.step_after(i)
        if step is not None:
            state = pruner.prune(state, ssm_out, step)
    return state
