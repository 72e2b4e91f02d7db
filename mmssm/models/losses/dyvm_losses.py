"""DyVM's training losses besides cross-entropy (as released in
NUS-HPC-AI-Lab/DyVM ``losses.py``, ``DyVMLoss_Token_Block``), each a
registered module with its own weight, used by
:class:`~mmssm.models.classifiers.dyvm_classifier.DyVMClassifier`."""

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mmssm.errors import UserError
from mmssm.registry import MODELS


@MODELS.register_module()
class TokenRatioLoss(nn.Module):
    """``w * (1 / S) * sum_s mean_b (mean_n d_s - r_s) ** 2``.

    Args:
        loss_weight (float): ``w``. Defaults to 10.0 (DyVM's).
    """

    def __init__(self, loss_weight: float = 10.0) -> None:
        super().__init__()
        self.loss_weight = float(loss_weight)

    def forward(
        self, decisions: Sequence[Tensor], targets: Sequence[float]
    ) -> Tensor:
        """Args:
        decisions (Sequence[Tensor]): Per step, (B, M) hard keep
            decisions over the patch tokens (straight-through).
        targets (Sequence[float]): Per step, the cumulative keep ratio.
        """
        if len(decisions) != len(targets):
            raise UserError(
                f'{len(decisions)} token decisions for {len(targets)} keep '
                'ratios: the backbone did not run its learned pruning '
                '(is it in training mode?)'
            )
        loss = sum(
            ((d.mean(1) - r) ** 2).mean() for d, r in zip(decisions, targets)
        )
        return self.loss_weight * loss / len(targets)


@MODELS.register_module()
class DirectionRatioLoss(nn.Module):
    """``w * (mean of all direction bits - rho) ** 2``.

    Args:
        target (float): ``rho``, the kept fraction of scan directions.
            Defaults to 0.8 (DyVM's for Vim-T/S; 0.7 for Vim-B).
        loss_weight (float): ``w``. Defaults to 10.0 (DyVM's).
    """

    def __init__(self, target: float = 0.8, loss_weight: float = 10.0):
        super().__init__()
        if not 0 < target <= 1:
            raise UserError(
                f'DirectionRatioLoss target must be in (0, 1], got {target}'
            )
        self.target = float(target)
        self.loss_weight = float(loss_weight)

    def forward(self, gates: Sequence[Tensor]) -> Tensor:
        """Args:
        gates (Sequence[Tensor]): Per gated layer, (B, n_dir) bits.
        """
        if not gates:
            raise UserError(
                'DirectionRatioLoss got no direction gates: build the '
                'backbone with direction_gate=True, or set the loss to None'
            )
        mean = torch.stack([g.mean() for g in gates]).mean()
        return self.loss_weight * (mean - self.target) ** 2


@MODELS.register_module()
class LogitDistillLoss(nn.Module):
    """``w * KL`` between the class distributions of student and teacher
    at temperature 1, as released: ``F.kl_div(log_softmax(student),
    log_softmax(teacher), reduction='batchmean', log_target=True)``, i.e.
    ``sum p_t (log p_t - log p_s)`` averaged over the batch.

    Args:
        loss_weight (float): ``w``. Defaults to 0.5 (DyVM's).
    """

    def __init__(self, loss_weight: float = 0.5) -> None:
        super().__init__()
        self.loss_weight = float(loss_weight)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        loss = F.kl_div(
            F.log_softmax(student, dim=1),
            F.log_softmax(teacher, dim=1),
            reduction='batchmean',
            log_target=True,
        )
        return self.loss_weight * loss


@MODELS.register_module()
class TokenDistillLoss(nn.Module):
    """``w * MSE`` between the student's final normed kept patch tokens
    and the teacher's at the same original positions (mean over the kept
    tokens of the batch and the channels; 0 if none is kept).

    Args:
        loss_weight (float): ``w``. Defaults to 0.5 (DyVM's).
    """

    def __init__(self, loss_weight: float = 0.5) -> None:
        super().__init__()
        self.loss_weight = float(loss_weight)

    def forward(self, student: Tensor, teacher: Tensor, kept: Tensor):
        """Args:
        student (Tensor): (B, M, C) patch tokens in original order.
        teacher (Tensor): (B, M, C) the teacher's.
        kept (Tensor): (B, M) bool, the student's kept tokens.
        """
        if not bool(kept.any()):
            return student.sum() * 0
        diff = (student - teacher)[kept]
        return self.loss_weight * diff.pow(2).mean()
