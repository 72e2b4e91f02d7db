from .learned_pruner import LearnedTokenPruner
from .predictor import PredictorScore, TokenPredictor
from .schedules import DYVM_SCHEDULES, PAPER_SCHEDULES, paper_schedule
from .scorers import (
    SSM_SCORES,
    GivenScore,
    RandomScore,
    TokenScorer,
    build_scorer,
)
from .token_pruner import (
    ALIGN_GAP_MODES,
    TokenPruner,
    build_token_pruner,
    run_layers,
)
from .token_state import TokenState

__all__ = [
    'LearnedTokenPruner',
    'PredictorScore',
    'TokenPredictor',
    'DYVM_SCHEDULES',
    'PAPER_SCHEDULES',
    'paper_schedule',
    'SSM_SCORES',
    'GivenScore',
    'RandomScore',
    'TokenScorer',
    'build_scorer',
    'ALIGN_GAP_MODES',
    'TokenPruner',
    'build_token_pruner',
    'run_layers',
    'TokenState',
]
