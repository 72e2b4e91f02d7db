from .checkpoint import allow_mmengine_checkpoints
from .flops import (
    SCAN_CONVENTIONS,
    FlopsReport,
    count_flops,
    count_params,
    infer_scan_convention,
)

__all__ = [
    'allow_mmengine_checkpoints',
    'SCAN_CONVENTIONS',
    'FlopsReport',
    'count_flops',
    'count_params',
    'infer_scan_convention',
]
