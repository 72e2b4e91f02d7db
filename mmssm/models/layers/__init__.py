from .direction_gate import (
    DirectionGate,
    add_gated,
    build_direction_gate,
    record_gates,
)
from .mamba_init import dt_rank_of, init_dt_proj, s4d_real_log
from .norm import RMSNorm, build_norm, build_token_norm, upcast
from .pos_embed import insert_cls_slot, resize_pos_embed, split_cls_slot

__all__ = [
    'DirectionGate',
    'build_direction_gate',
    'record_gates',
    'add_gated',
    'dt_rank_of',
    'init_dt_proj',
    's4d_real_log',
    'RMSNorm',
    'build_norm',
    'build_token_norm',
    'upcast',
    'insert_cls_slot',
    'resize_pos_embed',
    'split_cls_slot',
]
