from .pos_embed import resize_pos_embed
from .token_pruner import TokenState

__all__ = ['resize_pos_embed', 'TokenState']
