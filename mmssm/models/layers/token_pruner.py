"""Token pruning of vision state-space models, shared by the backbones.

Implements the token pruning of "Exploring Token Pruning in Vision State
Space Models" (NeurIPS 2024): after scheduled layers, each image keeps the
tokens with the highest SSM-specific importance, the kept tokens stay in
their original order, and the layers that follow scan them at their original
positions (the pruning-aware hidden-state alignment, done by the layers
themselves from the kept tokens' indices).

A backbone that prunes keeps computing only its kept tokens, in their
original order, and remembers every pruned token as it was when it was
pruned ("freeze and fill"): dense heads and the adapter always get the full
sequence back from :meth:`TokenState.full`.

* :class:`TokenState`: the tokens flowing through a backbone.
* :func:`token_importance`: the importance score of each token.
* :class:`TokenPruner`: a validated schedule (where to prune, how many
  tokens to keep, which score, whether the scan is aligned) and the pruning
  step itself.
* :func:`run_layers`: the layer loop of a backbone's ``run_layers``, with
  the scheduled pruning steps.
"""

import dataclasses
import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Callable, Iterable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from mmssm.ops.selective_scan import GAP_MODES


@dataclass
class TokenState:
    """The tokens flowing through a backbone.

    Args:
        tokens (Tensor): (B, K, C), the tokens still computed.
        hw (tuple[int, int]): The patch grid (h, w).
        index (Tensor, optional): (B, K) int64, the sorted positions of
            ``tokens`` in the full sequence; None while nothing is pruned.
        frozen (Tensor, optional): (B, L, C), the full sequence in which a
            pruned token keeps its value from the step that pruned it; None
            while nothing is pruned.
        cls_index (int, optional): Position of a class token in the full
            sequence (Vim's middle class token); it is never pruned.
            Defaults to None.
    """

    tokens: Tensor
    hw: Tuple[int, int]
    index: Optional[Tensor] = None
    frozen: Optional[Tensor] = None
    cls_index: Optional[int] = None

    @property
    def pruned(self) -> bool:
        """Whether the state holds a subset of the sequence."""
        return self.index is not None

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
        return self.frozen.to(self.tokens.dtype).scatter(1, index, self.tokens)

    def kept_mask(self) -> Tensor:
        """(B, L) bool: True at the positions of the computed tokens."""
        batch = self.tokens.shape[0]
        if self.index is None:
            return self.tokens.new_ones(batch, self.seq_len, dtype=torch.bool)
        mask = self.tokens.new_zeros(batch, self.seq_len, dtype=torch.bool)
        return mask.scatter(1, self.index, True)


#: The importance scores of :func:`token_importance`.
METRICS = ('clip', 'l1', 'l2', 'raw')


def token_importance(ssm_out: Tensor, metric: str = 'clip') -> Tensor:
    """The importance of each token from a layer's SSM output.

    ``ssm_out`` is the layer's gated SSM output ``y`` (B, K, E), summed
    over the scan directions with each direction mapped back to token order
    (the layers' ``return_ssm_out``). Per token ``i``:

    * 'clip' (the paper's score): ``sum_c max(0, y_ic)``;
    * 'l1': ``sum_c |y_ic|``;
    * 'l2': ``sqrt(sum_c y_ic ** 2)``;
    * 'raw': ``sum_c y_ic``.

    The score is detached: pruning selects tokens, it is not trained.

    Args:
        ssm_out (Tensor): (B, K, E).
        metric (str): One of :data:`METRICS`. Defaults to 'clip'.

    Returns:
        Tensor: (B, K) scores, without gradient.
    """
    y = ssm_out.detach()
    if metric == 'clip':
        return y.clamp(min=0).sum(-1)
    if metric == 'l1':
        return y.abs().sum(-1)
    if metric == 'l2':
        return torch.linalg.vector_norm(y, dim=-1)
    if metric == 'raw':
        return y.sum(-1)
    raise ValueError(f'metric must be one of {METRICS}, got {metric!r}')


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


class TokenPruner:
    """A token-pruning schedule and the pruning step.

    Args:
        layers (Sequence[int]): Prune after these layers, 1-based as in the
            paper ("after the k-th layer"), strictly increasing, each in
            ``[1, num_layers - 1]`` (pruning after the last layer would
            change nothing).
        keep_ratios (float | Sequence[float]): The fraction of the tokens
            entering each step that is kept, each in (0, 1]; one number is
            used at every step. A step that enters with K prunable tokens
            keeps ``floor(ratio * K)`` of them (the product rounded to 6
            decimals first, so that 0.7 * 10 keeps 7); a step that would
            keep none raises a ValueError when the model runs.
        num_layers (int): Layers of the backbone.
        metric (str): Importance score, one of :data:`METRICS`; see
            :func:`token_importance`. Defaults to 'clip'.
        align (bool): Scan the kept tokens at their original positions (the
            paper's method); False is the naive baseline that scans them as
            a shorter sequence. Defaults to True.
        gap_mode (str): How the aligned scan crosses the pruned tokens:
            'prev', 'null' or 'none' (see :mod:`mmssm.ops.selective_scan`).
            Defaults to 'prev'.
        dense_layers (Iterable[int]): 0-based layers that need the full
            token grid (PlainMamba-L1's depthwise block after layer 0):
            every pruning step must come after them. Defaults to ().

    Class token: a state with ``cls_index`` (Vim's middle class token)
    never loses it, and the class token stays in the middle of the kept
    sequence at its original position: the ratio applies to the patch
    tokens, ``k // 2`` are kept among those before the class token and
    ``k - k // 2`` among those after it (the top scores of each side), so
    that the class token sits at index ``k // 2`` of the kept patch tokens,
    as it sits at ``M // 2`` of the ``M`` patch tokens of the full sequence.
    """

    #: The keys of a ``prune_cfg`` dict.
    CFG_KEYS = (
        'layers',
        'keep_ratios',
        'metric',
        'align',
        'gap_mode',
        'schedule',
    )

    def __init__(
        self,
        layers: Sequence[int],
        keep_ratios: Union[float, Sequence[float]],
        num_layers: int,
        metric: str = 'clip',
        align: bool = True,
        gap_mode: str = 'prev',
        dense_layers: Iterable[int] = (),
    ) -> None:
        self.num_layers = int(num_layers)
        self.layers = self._check_layers(layers, tuple(dense_layers))
        self.keep_ratios = self._check_ratios(keep_ratios, len(self.layers))
        if metric not in METRICS:
            raise ValueError(
                f'prune_cfg metric must be one of {METRICS}, got {metric!r}'
            )
        if gap_mode not in GAP_MODES:
            raise ValueError(
                f'prune_cfg gap_mode must be one of {GAP_MODES}, '
                f'got {gap_mode!r}'
            )
        if not isinstance(align, bool):
            raise ValueError(
                f'prune_cfg align must be True or False, got {align!r}'
            )
        self.metric = metric
        self.align = align
        self.gap_mode = gap_mode
        # 0-based layer after which a step runs -> step
        self._steps = {k - 1: s for s, k in enumerate(self.layers)}

    # ------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        prune_cfg: Union[None, str, dict],
        num_layers: int,
        paper_schedule: Optional[dict] = None,
        dense_layers: Iterable[int] = (),
    ) -> Optional['TokenPruner']:
        """A pruner from a backbone's ``prune_cfg``.

        Args:
            prune_cfg (None | str | dict): None: no pruning. 'paper': the
                arch's schedule (``paper_schedule``). A dict: the keyword
                arguments of :class:`TokenPruner` (``layers``,
                ``keep_ratios``, ``metric``, ``align``, ``gap_mode``); with
                ``schedule='paper'`` its ``layers`` and ``keep_ratios`` come
                from the arch's schedule (e.g. ``dict(schedule='paper',
                align=False)``, the naive baseline of the paper's schedule).
            num_layers (int): Layers of the backbone.
            paper_schedule (dict, optional): The arch's ``layers`` and
                ``keep_ratios``. Defaults to None (the arch has none).
            dense_layers (Iterable[int]): See :class:`TokenPruner`.
                Defaults to ().

        Returns:
            TokenPruner | None: None for no pruning.
        """
        if prune_cfg is None:
            return None
        if isinstance(prune_cfg, str):
            if prune_cfg != 'paper':
                raise ValueError(
                    f"prune_cfg must be None, 'paper' or a dict, got "
                    f'{prune_cfg!r}'
                )
            prune_cfg = dict(schedule='paper')
        if not isinstance(prune_cfg, dict):
            raise ValueError(
                f"prune_cfg must be None, 'paper' or a dict, got "
                f'{type(prune_cfg).__name__}'
            )
        cfg = dict(prune_cfg)
        unknown = sorted(set(cfg) - set(cls.CFG_KEYS))
        if unknown:
            raise ValueError(
                f'prune_cfg has unknown key(s) {unknown}; the keys are '
                f'{list(cls.CFG_KEYS)}'
            )
        schedule = cfg.pop('schedule', None)
        if schedule is not None:
            if schedule != 'paper':
                raise ValueError(
                    f"prune_cfg schedule must be 'paper', got {schedule!r}"
                )
            given = [k for k in ('layers', 'keep_ratios') if k in cfg]
            if given:
                raise ValueError(
                    f"prune_cfg with schedule='paper' takes its layers and "
                    f'keep_ratios from the arch; do not give {given}'
                )
            if paper_schedule is None:
                raise ValueError(
                    "prune_cfg 'paper': this arch has no paper schedule; "
                    'give layers and keep_ratios'
                )
            cfg.update(
                layers=paper_schedule['layers'],
                keep_ratios=paper_schedule['keep_ratios'],
            )
        missing = [k for k in ('layers', 'keep_ratios') if k not in cfg]
        if missing:
            raise ValueError(f'prune_cfg is missing {missing}')
        return cls(num_layers=num_layers, dense_layers=dense_layers, **cfg)

    def _check_layers(
        self, layers: Sequence[int], dense_layers: Tuple[int, ...]
    ) -> Tuple[int, ...]:
        if isinstance(layers, (str, bytes)) or not isinstance(
            layers, Sequence
        ):
            raise ValueError(
                f'prune_cfg layers must be a sequence of ints, got {layers!r}'
            )
        if not all(_is_int(k) for k in layers):
            raise ValueError(
                f'prune_cfg layers must be ints (1-based: prune after the '
                f'k-th layer), got {list(layers)}'
            )
        layers = tuple(int(k) for k in layers)
        if dense_layers:
            last = max(dense_layers)
            early = [k for k in layers if k <= last]
            if early:
                raise ValueError(
                    f'prune_cfg layers {list(layers)}: pruning after layer '
                    f'{early[0]} (1-based) comes before the depthwise block '
                    f'of layer index {last}, which needs the full token '
                    f'grid; prune after layer {last + 1} or later'
                )
        for k in layers:
            if not 1 <= k <= self.num_layers - 1:
                raise ValueError(
                    f'prune_cfg layers {list(layers)} has {k}, out of '
                    f'range: a step after the k-th layer needs 1 <= k <= '
                    f'{self.num_layers - 1} ({self.num_layers} layers)'
                )
        if any(b <= a for a, b in zip(layers[:-1], layers[1:])):
            raise ValueError(
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
            raise ValueError(
                f'prune_cfg keep_ratios must be a number or a sequence of '
                f'numbers, got {keep_ratios!r}'
            )
        if len(keep_ratios) != num_steps:
            raise ValueError(
                f'prune_cfg keep_ratios {list(keep_ratios)} must have one '
                f'ratio per layer of layers ({num_steps})'
            )
        for r in keep_ratios:
            if not _is_real(r) or not 0 < r <= 1:
                raise ValueError(
                    f'prune_cfg keep_ratios must be in (0, 1], got '
                    f'{list(keep_ratios)}'
                )
        return tuple(float(r) for r in keep_ratios)

    def __repr__(self) -> str:
        return (
            f'{type(self).__name__}(layers={self.layers}, '
            f'keep_ratios={self.keep_ratios}, metric={self.metric!r}, '
            f'align={self.align}, gap_mode={self.gap_mode!r})'
        )

    # ------------------------------------------------------------- running
    def step_after(self, layer: int) -> Optional[int]:
        """The step that runs after the 0-based ``layer``, or None."""
        return self._steps.get(layer)

    def num_keep(self, step: int, num_tokens: int) -> int:
        """Tokens kept by ``step`` of the ``num_tokens`` entering it.

        Args:
            step (int): Index of the step in the schedule.
            num_tokens (int): Prunable tokens entering the step.

        Returns:
            int: ``floor(ratio * num_tokens)``; a ValueError if it is 0.
        """
        ratio = self.keep_ratios[step]
        k = math.floor(round(ratio * num_tokens, 6))
        if k < 1:
            raise ValueError(
                f'prune_cfg keep_ratios[{step}] = {ratio} keeps no token of '
                f'the {num_tokens} entering the step after layer '
                f'{self.layers[step]}; use a larger ratio or a larger input'
            )
        return k

    def select(
        self,
        scores: Tensor,
        step: int,
        cls_slot: Optional[int] = None,
    ) -> Optional[Tensor]:
        """The slots of the kept tokens, per image, in their order.

        Args:
            scores (Tensor): (B, K) importance of the tokens entering.
            step (int): Index of the step in the schedule.
            cls_slot (int, optional): Slot of a class token that is never
                pruned and stays in the middle (see the class docstring):
                ``(K - 1) // 2``, where every earlier step has put it.
                Defaults to None.

        Returns:
            Tensor | None: int64 (B, k) increasing slots in ``0 .. K - 1``,
            or None when every token is kept.
        """
        K = scores.shape[1]
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
        as it is now (the first step freezes the whole current sequence,
        later steps scatter the current kept tokens into ``frozen`` before
        dropping more), so every pruned token keeps its value at the layer
        that pruned it. The kept tokens are gathered, which passes their
        gradients; the score is detached.

        Args:
            state (TokenState): The state after the step's layer.
            ssm_out (Tensor): (B, K, E) that layer's gated SSM output.
            step (int): Index of the step in the schedule.

        Returns:
            TokenState: The pruned state (the same state when the step keeps
            every token).
        """
        scores = token_importance(ssm_out, self.metric)
        batch, K, C = state.tokens.shape
        cls_slot = None
        if state.cls_index is not None:
            cls_slot = (K - 1) // 2
        slots = self.select(scores, step, cls_slot)
        if slots is None:
            return state
        if state.index is None:
            index = slots
        else:
            index = state.index.gather(1, slots)
        tokens = state.tokens.gather(1, slots[..., None].expand(-1, -1, C))
        return dataclasses.replace(
            state, tokens=tokens, index=index, frozen=state.full()
        )


#: How a layer scans a pruned state when the backbone has no pruner (a
#: state pruned elsewhere): aligned, crossing gaps as 'prev'.
DEFAULT_SCAN = dict(align=True, gap_mode='prev')

#: ``layer_fn(i, state, return_ssm_out)`` runs layer ``i`` on
#: ``state.tokens`` and returns the new tokens, or (tokens, SSM output).
LayerFn = Callable[[int, TokenState, bool], Union[Tensor, Tuple[Tensor, ...]]]


def scan_options(pruner: Optional[TokenPruner]) -> dict:
    """``align`` and ``gap_mode`` of the layers that run a pruned state."""
    if pruner is None:
        return dict(DEFAULT_SCAN)
    return dict(align=pruner.align, gap_mode=pruner.gap_mode)


def run_layers(
    state: TokenState,
    start: int,
    end: int,
    pruner: Optional[TokenPruner],
    layer_fn: LayerFn,
) -> TokenState:
    """Run layers ``start`` .. ``end - 1`` and the pruning steps among them.

    The loop of every backbone's ``run_layers``: after each layer that the
    schedule prunes after, the layer's SSM output ranks the tokens and
    :meth:`TokenPruner.prune` drops the least important ones. Any grouping
    of the layers (the adapter's interaction groups) prunes the same way.

    Args:
        state (TokenState): The state before layer ``start``.
        start (int): First layer (0-based).
        end (int): One past the last layer.
        pruner (TokenPruner, optional): The schedule; None: no pruning.
        layer_fn (Callable): ``layer_fn(i, state, return_ssm_out)`` runs
            layer ``i`` on ``state.tokens`` (on the kept tokens of a pruned
            state, see :func:`scan_options`) and returns the new tokens, and
            the layer's SSM output (B, K, E) if ``return_ssm_out``.

    Returns:
        TokenState: The state after layer ``end - 1`` and its step.
    """
    for i in range(start, end):
        step = None if pruner is None else pruner.step_after(i)
        if step is None:
            tokens = layer_fn(i, state, False)
            state = dataclasses.replace(state, tokens=tokens)
        else:
            tokens, ssm_out = layer_fn(i, state, True)
            state = dataclasses.replace(state, tokens=tokens)
            state = pruner.prune(state, ssm_out, step)
    return state
