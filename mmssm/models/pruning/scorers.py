"""Token scorers: how the token pruner ranks the tokens at a step.

A scorer is a module called as ``scorer(state, ssm_out, step)`` that
returns one score per computed token (B, K); the pruner keeps the highest.
The paper's scores read the pruning layer's gated SSM output; the reference
selections of the fidelity study ('random', 'given') are scorers too, and a
learned predictor is one more.
"""

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from mmssm.errors import UserError
from mmssm.registry import TOKEN_SCORERS

from .token_state import TokenState


class TokenScorer(nn.Module):
    """Base of the scorers: ``forward(state, ssm_out, step) -> (B, K)``.

    ``state`` holds the tokens after the pruning layer (the residual
    stream), ``ssm_out`` (B, K, E) that layer's gated SSM output summed
    over its scan directions in token order, ``step`` the index of the
    step in the schedule.
    """

    def forward(self, state: TokenState, ssm_out: Tensor, step: int) -> Tensor:
        raise NotImplementedError


class SSMOutputScore(TokenScorer):
    """A score of the SSM output, without gradient (selection is not
    trained); subclasses define :meth:`score` over the channels."""

    def score(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, state: TokenState, ssm_out: Tensor, step: int) -> Tensor:
        return self.score(ssm_out.detach())


@TOKEN_SCORERS.register_module(name='clip')
class ClipScore(SSMOutputScore):
    """The paper's score: ``sum_c max(0, y_ic)``."""

    def score(self, y: Tensor) -> Tensor:
        return y.clamp(min=0).sum(-1)


@TOKEN_SCORERS.register_module(name='l1')
class L1Score(SSMOutputScore):
    """``sum_c |y_ic|`` (the paper's ablation)."""

    def score(self, y: Tensor) -> Tensor:
        return y.abs().sum(-1)


@TOKEN_SCORERS.register_module(name='l2')
class L2Score(SSMOutputScore):
    """``||y_i||_2`` (the paper's ablation)."""

    def score(self, y: Tensor) -> Tensor:
        return torch.linalg.vector_norm(y, dim=-1)


@TOKEN_SCORERS.register_module(name='raw')
class RawScore(SSMOutputScore):
    """``sum_c y_ic``, no clipping (the paper's ablation)."""

    def score(self, y: Tensor) -> Tensor:
        return y.sum(-1)


#: The scores of the SSM output, by name.
SSM_SCORES = ('clip', 'l1', 'l2', 'raw')


@TOKEN_SCORERS.register_module(name='random')
class RandomScore(TokenScorer):
    """Uniform random scores: a random selection, reproducible by seed.

    Args:
        seed (int): Seed of the generator; :meth:`reset` restarts it.
            Defaults to 0.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        """Restart the sequence of random scores."""
        self.generator = torch.Generator().manual_seed(self.seed)

    def forward(self, state: TokenState, ssm_out: Tensor, step: int) -> Tensor:
        shape = state.tokens.shape[:2]
        scores = torch.rand(shape, generator=self.generator)
        return scores.to(state.tokens.device)


@TOKEN_SCORERS.register_module(name='given')
class GivenScore(TokenScorer):
    """Scores given by the caller, one per token of the full sequence.

    For reference selections computed outside the model (e.g. the fidelity
    study's oracle, which keeps the tokens an object covers): set
    :attr:`scores` (B, L) before each forward; every step reads them at the
    computed tokens' positions.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scores: Optional[Tensor] = None

    def forward(self, state: TokenState, ssm_out: Tensor, step: int) -> Tensor:
        if self.scores is None:
            raise UserError(
                "the 'given' scorer has no scores: set scorer.scores to a "
                '(batch, num_tokens) tensor before the forward'
            )
        expected = (state.tokens.shape[0], state.seq_len)
        if tuple(self.scores.shape) != expected:
            raise UserError(
                f"the 'given' scorer's scores are "
                f'{tuple(self.scores.shape)}; this forward needs {expected} '
                '(batch, tokens of the full sequence)'
            )
        scores = self.scores.to(state.tokens.device)
        if state.index is not None:
            scores = scores.gather(1, state.index)
        return scores


def build_scorer(cfg) -> TokenScorer:
    """A scorer from a name (``'clip'``) or a config dict."""
    if isinstance(cfg, str):
        cfg = dict(type=cfg)
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise UserError(
            f'prune_cfg scorer must be a name or a dict with a type, got '
            f'{cfg!r}'
        )
    if TOKEN_SCORERS.get(cfg['type']) is None:
        names = sorted(TOKEN_SCORERS.module_dict)
        raise UserError(
            f'prune_cfg scorer {cfg["type"]!r} is not a registered scorer; '
            f'the scorers are {names}'
        )
    return TOKEN_SCORERS.build(cfg)
