"""DyVM's classifier: mmpretrain's ``ImageClassifier`` with DyVM's losses
and a frozen dense teacher (Dynamic Vision Mamba, arXiv 2504.04787).

This module imports mmpretrain, so ``import mmssm.models`` does not import
it (detection and segmentation users need no mmpretrain). A config that
builds ``mmssm.DyVMClassifier`` lists it in ``custom_imports``, as
OpenMMLab configs do for plug-in modules (see ``configs/dyvm``)::

    custom_imports = dict(
        imports=['mmssm.models', 'mmssm.models.classifiers.dyvm_classifier'],
        allow_failed_imports=False,
    )
"""

import copy
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from mmengine.registry import DefaultScope
from mmpretrain.models.classifiers import ImageClassifier
from mmpretrain.registry import MODELS as PRETRAIN_MODELS
from torch import Tensor

from mmssm.errors import UserError
from mmssm.registry import MODELS


def _patch_tokens(x: Tensor, cls_index: Optional[int]) -> Tensor:
    """(B, L, ...) without the class token's column."""
    if cls_index is None:
        return x
    return torch.cat([x[:, :cls_index], x[:, cls_index + 1 :]], 1)


@MODELS.register_module()
class DyVMClassifier(ImageClassifier):
    """``ImageClassifier`` trained with DyVM's losses.

    Training loss terms, each logged under its own name and switched off
    by setting its config to None (or, for the teacher's two, ``teacher``
    to None):

    * ``loss_cls``: the head's loss (cross-entropy; with mixup/cutmix
      batch augments the soft targets of mmpretrain's data preprocessor);
    * ``loss_token_ratio``: :class:`~mmssm.models.losses.TokenRatioLoss`
      of the learned pruner's decisions against its cumulative ratios;
    * ``loss_direction_ratio``:
      :class:`~mmssm.models.losses.DirectionRatioLoss` of the direction
      gates (``backbone.direction_gate=True``);
    * ``loss_distill_kl``: :class:`~mmssm.models.losses.LogitDistillLoss`
      to the teacher's logits;
    * ``loss_distill_tokens``:
      :class:`~mmssm.models.losses.TokenDistillLoss` between the final
      normed kept patch tokens and the teacher's at the same positions.

    The teacher is the same classifier without pruning and direction gates
    (``prune_cfg=None``, ``direction_gate=False``), frozen and always in
    eval mode, run without gradient on the same (augmented) inputs. It is
    not a submodule: it is neither saved in checkpoints nor seen by the
    optimizer, and moves with the model (``to``, ``cuda``, ``double``). Its
    weights come from ``teacher['checkpoint']`` (the dense checkpoint the
    student's ``load_from`` names, loaded strictly at ``init_weights``,
    so a resumed run gets the same teacher), or, with None, from the
    student's weights at ``init_weights`` (tests, synthetic runs).

    Args:
        backbone (dict): An mmssm backbone with a learned pruner
            (``prune_cfg`` of type ``mmssm.LearnedTokenPruner``) and/or
            ``direction_gate=True``.
        head (dict): The classification head.
        token_ratio_loss (dict, optional): Defaults to
            ``dict(type='mmssm.TokenRatioLoss', loss_weight=10.0)``.
        direction_ratio_loss (dict, optional): Defaults to
            ``dict(type='mmssm.DirectionRatioLoss', target=0.8,
            loss_weight=10.0)``.
        distill_kl_loss (dict, optional): Defaults to
            ``dict(type='mmssm.LogitDistillLoss', loss_weight=0.5)``.
        distill_tokens_loss (dict, optional): Defaults to
            ``dict(type='mmssm.TokenDistillLoss', loss_weight=0.5)``.
        teacher (dict, optional): ``dict(checkpoint=PATH or None)``; None:
            no teacher (and no distillation). Defaults to
            ``dict(checkpoint=None)``.
        neck, pretrained, train_cfg, data_preprocessor, init_cfg: As
            ``ImageClassifier``.
    """

    _DEFAULT = object()

    def __init__(
        self,
        backbone: dict,
        head: dict,
        token_ratio_loss: Optional[dict] = _DEFAULT,
        direction_ratio_loss: Optional[dict] = _DEFAULT,
        distill_kl_loss: Optional[dict] = _DEFAULT,
        distill_tokens_loss: Optional[dict] = _DEFAULT,
        teacher: Optional[dict] = _DEFAULT,
        neck: Optional[dict] = None,
        pretrained: Optional[str] = None,
        train_cfg: Optional[dict] = None,
        data_preprocessor: Optional[dict] = None,
        init_cfg: Optional[dict] = None,
    ) -> None:
        if not isinstance(backbone, dict) or not isinstance(head, dict):
            raise UserError('DyVMClassifier takes backbone and head configs')
        defaults = dict(
            token_ratio_loss=dict(type='mmssm.TokenRatioLoss'),
            direction_ratio_loss=dict(type='mmssm.DirectionRatioLoss'),
            distill_kl_loss=dict(type='mmssm.LogitDistillLoss'),
            distill_tokens_loss=dict(type='mmssm.TokenDistillLoss'),
            teacher=dict(checkpoint=None),
        )
        given = dict(
            token_ratio_loss=token_ratio_loss,
            direction_ratio_loss=direction_ratio_loss,
            distill_kl_loss=distill_kl_loss,
            distill_tokens_loss=distill_tokens_loss,
            teacher=teacher,
        )
        cfgs = {
            k: defaults[k] if v is self._DEFAULT else v
            for k, v in given.items()
        }
        # mmpretrain's scope for its own types (head, preprocessor)
        with DefaultScope.overwrite_default_scope('mmpretrain'):
            super().__init__(
                backbone=copy.deepcopy(backbone),
                neck=neck,
                head=copy.deepcopy(head),
                pretrained=pretrained,
                train_cfg=train_cfg,
                data_preprocessor=data_preprocessor,
                init_cfg=init_cfg,
            )
        for name in (
            'token_ratio_loss',
            'direction_ratio_loss',
            'distill_kl_loss',
            'distill_tokens_loss',
        ):
            cfg = cfgs[name]
            setattr(self, name, None if cfg is None else MODELS.build(cfg))
        if self.token_ratio_loss is not None and not hasattr(
            getattr(self.backbone, 'pruner', None), 'tau'
        ):
            raise UserError(
                'DyVMClassifier token_ratio_loss needs a learned '
                'pruner: backbone prune_cfg of type '
                "'mmssm.LearnedTokenPruner' (or 'dyvm'); set "
                'token_ratio_loss=None for a model without one'
            )
        teacher_cfg = cfgs['teacher']
        self.teacher_checkpoint = None
        teacher_model = None
        if teacher_cfg is not None:
            unknown = sorted(set(teacher_cfg) - {'checkpoint'})
            if unknown:
                raise UserError(
                    f'DyVMClassifier teacher has unknown key(s) '
                    f"{unknown}; its only key is 'checkpoint'"
                )
            self.teacher_checkpoint = teacher_cfg.get('checkpoint')
            dense = dict(copy.deepcopy(backbone), prune_cfg=None)
            if 'direction_gate' in dense:
                dense['direction_gate'] = False
            dense.pop('init_cfg', None)  # weights: from the checkpoint
            with DefaultScope.overwrite_default_scope('mmpretrain'):
                teacher_model = PRETRAIN_MODELS.build(
                    dict(
                        type='ImageClassifier',
                        backbone=dense,
                        neck=copy.deepcopy(neck),
                        head=copy.deepcopy(head),
                    )
                )
            teacher_model.requires_grad_(False)
            teacher_model.eval()
        elif (
            self.distill_kl_loss is not None
            or self.distill_tokens_loss is not None
        ):
            raise UserError(
                'DyVMClassifier distillation losses need a teacher; set '
                'distill_kl_loss and distill_tokens_loss to None, or give '
                'teacher=dict(checkpoint=...)'
            )
        # a list hides it from state_dict, parameters() and the optimizer
        self._teacher: List[nn.Module] = (
            [] if teacher_model is None else [teacher_model]
        )

    @property
    def teacher(self) -> Optional[nn.Module]:
        """The frozen dense teacher, or None."""
        return self._teacher[0] if self._teacher else None

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self._teacher:  # moves and casts with the student
            self._teacher[0]._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True) -> 'DyVMClassifier':
        super().train(mode)
        if self._teacher:
            self._teacher[0].eval()  # never trained
        return self

    def init_weights(self) -> None:
        """Initialise the student, then load the teacher's weights (from
        ``teacher['checkpoint']``, strictly, or the student's)."""
        super().init_weights()
        teacher = self.teacher
        if teacher is None:
            return
        if self.teacher_checkpoint is not None:
            from mmssm.utils.checkpoint import load_checkpoint_strict

            load_checkpoint_strict(teacher, self.teacher_checkpoint)
        else:
            own = self.state_dict()
            wanted = teacher.state_dict()
            missing = sorted(k for k in wanted if k not in own)
            if missing:
                raise UserError(
                    f'the teacher has weights the student lacks: {missing}'
                )
            teacher.load_state_dict({k: own[k] for k in wanted})
        teacher.eval()

    def loss(self, inputs: Tensor, data_samples: list) -> Dict[str, Tensor]:
        """DyVM's loss terms, each under its own name (see the class)."""
        feats = self.extract_feat(inputs)
        losses = {}
        for key, value in self.head.loss(feats, data_samples).items():
            losses['loss_cls' if key == 'loss' else key] = value
        backbone = self.backbone
        aux = backbone.aux_outputs
        if self.token_ratio_loss is not None:
            losses['loss_token_ratio'] = self.token_ratio_loss(
                aux.get('token_decisions', []), backbone.pruner.keep_ratios
            )
        if self.direction_ratio_loss is not None:
            losses['loss_direction_ratio'] = self.direction_ratio_loss(
                aux.get('direction_gates', [])
            )
        teacher = self.teacher
        if teacher is None:
            return losses
        if self.distill_tokens_loss is not None:
            state = backbone.final_state
            tokens = backbone.final_tokens(state)
            kept = _patch_tokens(state.kept_mask(), state.cls_index)
        with torch.no_grad():
            t_feats = teacher.extract_feat(inputs)
            t_logits = teacher.head(t_feats)
            t_backbone = teacher.backbone
            t_state = t_backbone.final_state
            t_tokens = t_backbone.final_tokens(t_state)
        if self.distill_kl_loss is not None:
            losses['loss_distill_kl'] = self.distill_kl_loss(
                self.head(feats), t_logits
            )
        if self.distill_tokens_loss is not None:
            losses['loss_distill_tokens'] = self.distill_tokens_loss(
                _patch_tokens(tokens, state.cls_index),
                _patch_tokens(t_tokens, t_state.cls_index),
                kept,
            )
        return losses
