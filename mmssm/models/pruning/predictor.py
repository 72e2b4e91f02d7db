"""DyVM's learned token predictor, a registered scorer ('predictor').

One small network per pruning step reads the tokens entering the step
(the residual stream) and gives each patch token a log-probability of
being kept. Its features are half local (the token's own) and half global
(the mean over the patch tokens still kept, the class token excluded), so
the decision of a token depends on what else the image still has.
"""

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from mmssm.registry import TOKEN_SCORERS

from .scorers import TokenScorer
from .token_state import TokenState


class TokenPredictor(nn.Module):
    """One step's predictor (DyVM's ``PredictorLG``, same layout).

    ``in_conv``: LayerNorm -> Linear(D, D) -> GELU. The first D/2
    channels stay per token (local); the last D/2 are pooled over the kept
    patch tokens, ``sum(g * pi) / (sum(pi) + 1)`` with ``pi`` the keep
    policy (the ``+ 1`` is the released guard against an empty policy, kept
    so that released weights give released outputs). ``out_conv``: the
    concatenation -> Linear(D, D/2) -> GELU -> Linear(D/2, D/4) -> GELU ->
    Linear(D/4, 2) -> log-softmax; channel 0 is "keep".

    Args:
        embed_dims (int): Token channels D (even).
    """

    def __init__(self, embed_dims: int) -> None:
        super().__init__()
        D = int(embed_dims)
        self.in_conv = nn.Sequential(
            nn.LayerNorm(D), nn.Linear(D, D), nn.GELU()
        )
        self.out_conv = nn.Sequential(
            nn.Linear(D, D // 2),
            nn.GELU(),
            nn.Linear(D // 2, D // 4),
            nn.GELU(),
            nn.Linear(D // 4, 2),
            nn.LogSoftmax(dim=-1),
        )
        # the released model's _init_weights: trunc normal 0.02, zero bias
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, policy: Tensor) -> Tensor:
        """Keep/drop log-probabilities.

        Args:
            x (Tensor): (B, K, D) tokens.
            policy (Tensor): (B, K) weights of the global pool: 1 for the
                kept patch tokens, 0 for pruned ones and the class token.

        Returns:
            Tensor: (B, K, 2) log-probabilities, channel 0 = keep.
        """
        x = self.in_conv(x)
        half = x.shape[-1] // 2
        local, glob = x[..., :half], x[..., half:]
        policy = policy[..., None].to(x.dtype)
        pooled = (glob * policy).sum(1, keepdim=True) / (
            policy.sum(1, keepdim=True) + 1
        )
        x = torch.cat([local, pooled.expand_as(glob)], dim=-1)
        return self.out_conv(x)


@TOKEN_SCORERS.register_module(name='predictor')
class PredictorScore(TokenScorer):
    """The learned scorer: ``log p(keep)`` from one predictor per step.

    Reads the tokens entering the step (``state.tokens``, the residual
    stream after the pruning layer), not the SSM output. The pool runs over
    the patch tokens that are kept: all computed ones when tokens are
    physically pruned, those with ``state.token_mask`` 1 in the masked
    training mode; the class token never enters it.

    Args:
        embed_dims (int): Token channels (the backbone sets it).
        num_steps (int): Pruning steps (the pruner sets it).
    """

    def __init__(self, embed_dims: int, num_steps: int) -> None:
        super().__init__()
        self.predictors = nn.ModuleList(
            [TokenPredictor(embed_dims) for _ in range(num_steps)]
        )

    @staticmethod
    def policy(state: TokenState) -> Tensor:
        """(B, K): 1 at the patch tokens still kept, 0 elsewhere (pruned,
        class token); straight-through in the masked mode."""
        tokens = state.tokens
        if state.token_mask is not None:
            policy = state.token_mask.to(tokens.dtype)
        else:
            policy = tokens.new_ones(tokens.shape[:2])
        cls = state.cls_slots()
        if cls is not None:
            policy = policy.scatter(1, cls[:, None], 0.0)
        return policy

    def log_probs(self, state: TokenState, step: int) -> Tensor:
        """(B, K, 2) keep/drop log-probabilities of the computed tokens
        (the class token's row is meaningless: it is never a candidate)."""
        return self.predictors[step](state.tokens, self.policy(state))

    def forward(
        self, state: TokenState, ssm_out: Optional[Tensor], step: int
    ) -> Tensor:
        return self.log_probs(state, step)[..., 0]
