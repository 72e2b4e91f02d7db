"""DyVM's learned token pruning (Dynamic Vision Mamba, arXiv 2504.04787),
with the rearrangement of the release and the alignment of this project.

Training keeps the whole sequence and masks the pruned tokens (hard
Gumbel-softmax decisions, straight-through); inference deletes them. The
two give the same kept tokens and the same full-grid outputs for the same
decisions, in two ways (``align``):

* ``align=False`` (DyVM as released): each step stably partitions every
  image's tokens (kept first in their original order, pruned after) and
  re-centres the class token at ``k_b // 2`` of its ``k_b`` kept patch
  tokens; the mixers mask the pruned slots. In the forward scan they come
  after every kept token, in the backward scan first with zero state and
  input, so the kept outputs equal the compact scan of the kept tokens
  alone, which is what inference runs (``gap_mode='none'``). PlainMamba's
  2-D conv and four grid orders admit no such permutation: its tokens
  stay in place and its mixer skips the masked steps of each order
  (``gap_mode='none'`` with the mask), the same compact scan
  (``SSMBackbone.MASKED_REARRANGE``).
* ``align=True`` (ours): no partition; the tokens stay in place and the
  mixers mask the pruned ones. A masked slot is a zero-input token whose
  step decays the state by ``exp(softplus(b) A)``, which is the alignment
  scan with ``gap_mode='null'`` (and the position-aware conv), what
  inference runs on the kept tokens at their original positions. The
  class token stays at its place (``M // 2``).

In both modes a pruned token keeps the value it had when it was pruned
(freeze and fill, done by :meth:`SSMBackbone.run_layer` from the mask), so
dense outputs are the same in training and at inference.
"""

import math
from numbers import Real
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from mmssm.errors import UserError
from mmssm.registry import MODELS

from .predictor import PredictorScore
from .token_pruner import TokenPruner
from .token_state import TokenState


@MODELS.register_module()
class LearnedTokenPruner(TokenPruner):
    """A learned token pruner: DyVM's predictor, schedule and training.

    A subclass of :class:`TokenPruner` (schedule checks, ``step_after``,
    step hooks, :func:`~mmssm.models.pruning.run_layers` all shared): what
    differs is the step. The predictor is a registered scorer
    ('predictor'), so the same pruner also runs a fixed selection (the
    'given' scorer: its top-k, as at inference, is then also the training
    decision; the tests use it to compare training with inference).

    Args:
        layers (Sequence[int]): Prune after these layers, 1-based (DyVM's
            "before 0-based layer k" is "after layer k"): Vim (6, 12, 18).
        keep_ratios (float | Sequence[float]): Cumulative fractions of the
            ``M`` patch tokens kept after each step: one number ``r`` means
            ``r, r**2, r**3, ...`` as released; a step keeps
            ``int(ratio * M)`` tokens at inference (the product rounded to
            6 decimals first). Non-increasing, each in (0, 1].
        num_layers (int): Layers of the backbone (the backbone sets it).
        embed_dims (int): Token channels (the backbone sets it).
        scorer (str | dict): 'predictor' (DyVM's) or another registered
            scorer. Defaults to 'predictor'.
        align (bool): False: DyVM's rearrangement (compact scan at
            inference); True: masks in place, the aligned 'null' scan at
            inference. Defaults to False.
        gap_mode (str): Must be 'null' (the only gap a masked slot equals).
            Defaults to 'null'.
        tau (float): Gumbel-softmax temperature. Defaults to 1.0.
        dense_layers (Iterable[int]): See :class:`TokenPruner`.
        init_cfg (dict, optional): Defaults to None.

    Training (the module in train mode): at each step every image samples
    hard keep decisions ``onehot(argmax(log p + g)) * pi`` (``g`` Gumbel
    noise, ``pi`` the previous keep mask; straight-through gradients), so
    images keep different numbers of tokens. The decisions (B, M) of each
    step, in the original patch order, are appended to
    ``state.aux['token_decisions']`` for the token-ratio loss.
    Inference: ``log p(keep)`` -> top ``int(ratio * M)`` patch tokens ->
    sorted to their original order -> gathered; the class token is never a
    candidate.
    """

    #: :func:`build_token_pruner` passes the backbone's ``embed_dims``.
    takes_embed_dims = True

    def __init__(
        self,
        layers: Sequence[int],
        keep_ratios: Union[float, Sequence[float]],
        num_layers: int,
        embed_dims: int,
        scorer: Union[str, dict] = 'predictor',
        align: bool = False,
        gap_mode: str = 'null',
        tau: float = 1.0,
        dense_layers: Iterable[int] = (),
        init_cfg: Optional[dict] = None,
    ) -> None:
        if gap_mode != 'null':
            raise UserError(
                f"prune_cfg gap_mode of a learned pruner must be 'null' "
                f'(a masked token is a zero-input step), got {gap_mode!r}'
            )
        if not isinstance(tau, Real) or tau <= 0:
            raise UserError(f'prune_cfg tau must be > 0, got {tau!r}')
        num_steps = len(layers) if isinstance(layers, Sequence) else 0
        if isinstance(keep_ratios, Real) and not isinstance(keep_ratios, bool):
            keep_ratios = tuple(
                round(keep_ratios ** (s + 1), 12) for s in range(num_steps)
            )
        if isinstance(scorer, str):
            scorer = dict(type=scorer)
        if isinstance(scorer, dict) and scorer.get('type') == 'predictor':
            scorer = dict(scorer, embed_dims=embed_dims, num_steps=num_steps)
        super().__init__(
            layers,
            keep_ratios,
            num_layers,
            scorer=scorer,
            align=align,
            gap_mode=gap_mode,
            dense_layers=dense_layers,
            init_cfg=init_cfg,
        )
        ratios = self.keep_ratios
        if any(b > a for a, b in zip(ratios[:-1], ratios[1:])):
            raise UserError(
                f'prune_cfg keep_ratios of a learned pruner are cumulative '
                f'(fractions of all patch tokens): they cannot increase, '
                f'got {list(ratios)}'
            )
        self.embed_dims = int(embed_dims)
        self.tau = float(tau)
        #: ``align=False`` in training: permute the tokens (kept first), or
        #: leave them in place for mixers that skip masked steps in
        #: ``gap_mode='none'`` (the backbone sets it, see
        #: ``SSMBackbone.MASKED_REARRANGE``).
        self.rearrange = True

    def extra_repr(self) -> str:
        return super().extra_repr() + f', tau={self.tau}'

    # ------------------------------------------------------------- running
    @staticmethod
    def _patch_mask(state: TokenState) -> Tensor:
        """(B, K) bool: True at the patch tokens (not the class token)."""
        B, K = state.tokens.shape[:2]
        mask = torch.ones(B, K, dtype=torch.bool, device=state.tokens.device)
        cls = state.cls_slots()
        if cls is not None:
            mask = mask.scatter(1, cls[:, None], False)
        return mask

    def num_patches(self, state: TokenState) -> int:
        """``M``, the patch tokens of the full sequence."""
        return int(state.seq_len) - int(state.cls_index is not None)

    def prune(
        self, state: TokenState, ssm_out: Tensor, step: int
    ) -> TokenState:
        """Run step ``step``: masked in training, pruned at inference.

        Args:
            state (TokenState): The state after the step's layer.
            ssm_out (Tensor): That layer's gated SSM output (unused by the
                predictor; other scorers may read it).
            step (int): Index of the step in the schedule.

        Returns:
            TokenState: The state after the step.
        """
        if self.training:
            after, scores = self._mask_step(state, ssm_out, step)
        else:
            after, scores = self._prune_step(state, ssm_out, step)
        for hook in self._step_hooks.values():
            hook(self, step, state, after, scores)
        return after

    def _prune_step(self, state: TokenState, ssm_out: Tensor, step: int):
        """Inference: keep the top ``int(r_s M)`` patch tokens."""
        if state.masked:
            raise UserError(
                'a masked (training-mode) token state reached a learned '
                'pruner in eval mode; run the whole forward in one mode'
            )
        scores = self.scorer(state, ssm_out, step)
        is_patch = self._patch_mask(state)
        k = self.num_keep(step, self.num_patches(state))
        # the patch tokens present (from shapes, so that the meta device
        # can count FLOPs): the class token is never pruned
        present = state.tokens.shape[1] - int(state.cls_index is not None)
        if k >= present:
            return state, scores
        top = scores.masked_fill(~is_patch, -math.inf).topk(k, dim=1)
        slots = top.indices.sort(dim=1).values
        cls = state.cls_slots()
        if cls is not None:
            if self.align:  # in place
                slots = torch.cat([slots, cls[:, None]], 1).sort(dim=1).values
            else:  # re-centred at k // 2 of the kept
                c = k // 2
                parts = [slots[:, :c], cls[:, None], slots[:, c:]]
                slots = torch.cat(parts, 1)
        C = state.tokens.shape[-1]
        index = slots if state.index is None else state.index.gather(1, slots)
        tokens = state.tokens.gather(1, slots[..., None].expand(-1, -1, C))
        after = TokenState(
            tokens,
            state.hw,
            index=index,
            frozen=state.full(),
            cls_index=state.cls_index,
            patch_stride=state.patch_stride,
            aux=state.aux,
        )
        return after, scores

    def _decide(
        self, state: TokenState, ssm_out: Tensor, step: int, policy: Tensor
    ):
        """Hard keep decisions (B, K) of the patch tokens still kept, and
        the scores the step hooks see."""
        if isinstance(self.scorer, PredictorScore):
            log_probs = self.scorer.log_probs(state, step)
            keep = F.gumbel_softmax(log_probs, tau=self.tau, hard=True)
            return keep[..., 0] * policy, log_probs[..., 0]
        # a fixed scorer: its inference selection, as a mask (no gradient)
        scores = self.scorer(state, ssm_out, step)
        k = self.num_keep(step, self.num_patches(state))
        top = scores.masked_fill(policy <= 0.5, -math.inf).topk(k, dim=1)
        keep = torch.zeros_like(policy).scatter(1, top.indices, 1.0)
        return keep, scores

    def _mask_step(self, state: TokenState, ssm_out: Tensor, step: int):
        """Training: decide, record, and partition (``align=False``)."""
        tokens = state.tokens
        B, L = tokens.shape[:2]
        if not state.masked:
            if state.index is not None:
                raise UserError(
                    'a learned pruner in training mode got a physically '
                    'pruned token state; run the whole forward in one mode'
                )
            state = TokenState(
                tokens,
                state.hw,
                cls_index=state.cls_index,
                patch_stride=state.patch_stride,
                token_mask=tokens.new_ones(B, L),
                aux=state.aux,
            )
        is_patch = self._patch_mask(state)
        policy = state.token_mask * is_patch
        keep, scores = self._decide(state, ssm_out, step, policy)
        # exact 0/1 values: 1 at the class token, the decisions elsewhere
        mask = keep + (~is_patch).to(keep.dtype)

        # the decisions over the patch tokens in their original order
        decisions = keep
        if state.index is not None:
            decisions = torch.zeros_like(keep).scatter(1, state.index, keep)
        if state.cls_index is not None:
            c = state.cls_index
            decisions = torch.cat([decisions[:, :c], decisions[:, c + 1 :]], 1)
        state.aux.setdefault('token_decisions', []).append(decisions)

        if self.align or not self.rearrange:
            after = TokenState(
                tokens,
                state.hw,
                cls_index=state.cls_index,
                patch_stride=state.patch_stride,
                token_mask=mask,
                aux=state.aux,
            )
            return after, scores
        perm = self.partition(mask.detach() > 0.5, is_patch)
        index = state.index
        if index is None:
            index = torch.arange(L, device=tokens.device).expand(B, L)
        C = tokens.shape[-1]
        after = TokenState(
            tokens.gather(1, perm[..., None].expand(-1, -1, C)),
            state.hw,
            index=index.gather(1, perm),
            cls_index=state.cls_index,
            patch_stride=state.patch_stride,
            token_mask=mask.gather(1, perm),
            aux=state.aux,
        )
        return after, scores

    @staticmethod
    def partition(kept: Tensor, is_patch: Tensor) -> Tensor:
        """The stable partition of every image, vectorised.

        Args:
            kept (Tensor): (B, K) bool, the kept tokens (class included).
            is_patch (Tensor): (B, K) bool, False at the class token.

        Returns:
            Tensor: (B, K) int64 ``perm``: slot ``j`` of the new order takes
            the token at slot ``perm[:, j]``. Kept patch tokens come first
            in their order, then the pruned ones in theirs; a class token
            goes to ``k_b // 2`` of the ``k_b`` kept patch tokens.
        """
        kept_patch = kept & is_patch
        num_kept = kept_patch.sum(1, keepdim=True)
        rank_kept = kept_patch.long().cumsum(1) - 1
        rank_pruned = (~kept).long().cumsum(1) - 1
        dest = torch.where(kept_patch, rank_kept, num_kept + rank_pruned)
        if not bool(is_patch.all()):
            c = num_kept // 2
            dest = torch.where(is_patch & (dest >= c), dest + 1, dest)
            dest = torch.where(is_patch, dest, c.expand_as(dest))
        order = torch.arange(kept.shape[1], device=kept.device)
        return torch.empty_like(dest).scatter(1, dest, order.expand_as(dest))
