from .pos_embed import resize_pos_embed
from .token_pruner import (
    METRICS,
    TokenPruner,
    TokenState,
    run_layers,
    scan_options,
    token_importance,
)

__all__ = [
    'resize_pos_embed',
    'METRICS',
    'TokenPruner',
    'TokenState',
    'run_layers',
    'scan_options',
    'token_importance',
]
