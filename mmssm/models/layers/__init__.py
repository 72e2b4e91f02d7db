from .pos_embed import resize_pos_embed

__all__ = ['resize_pos_embed']
