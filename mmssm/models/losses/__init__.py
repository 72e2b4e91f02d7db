from .dyvm_losses import (
    DirectionRatioLoss,
    LogitDistillLoss,
    TokenDistillLoss,
    TokenRatioLoss,
)

__all__ = [
    'DirectionRatioLoss',
    'LogitDistillLoss',
    'TokenDistillLoss',
    'TokenRatioLoss',
]
