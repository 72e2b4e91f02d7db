"""mmpretrain's ``ImageClassifier`` around an mmssm backbone, in code.

The classification configs name the model directly (``ImageClassifier``
with ``mmssm.PlainMamba`` or ``mmssm.Vim`` and a ``LinearClsHead``, see
``configs/_base_/models``). Tools and tests that build a classifier from a
backbone config in code use :func:`build_classifier`, which builds the same
model: the backbone's pooled feature (PlainMamba: the mean of the tokens
after ``ln1``; Vim: the middle class token after ``norm_f``, as the
releases) and a linear head whose keys are ``head.fc.*``, the layout that
the converters of ``tools/model_converters`` write.

mmpretrain is imported only when a classifier is built.
"""

import copy
from typing import Optional, Union

import torch.nn as nn
from mmengine.model import initialize
from mmengine.registry import DefaultScope

from mmssm.errors import UserError
from mmssm.registry import MODELS


def pooled_out_type(backbone_type: Union[str, type]) -> str:
    """The ``out_type`` of a backbone that gives a pooled (B, C) feature.

    Args:
        backbone_type (str | type): The registered name (scope prefix
            allowed) or the class.

    Returns:
        str: 'avg_featmap' for PlainMamba, 'cls_token' for Vim.

    Raises:
        UserError: If the type is not registered in mmssm or has no pooled
            output.
    """
    cls = (
        MODELS.get(backbone_type)
        if isinstance(backbone_type, str)
        else backbone_type
    )
    if cls is None:
        raise UserError(
            f'backbone type {backbone_type!r} is not registered in '
            'mmssm.registry.MODELS'
        )
    out_type = getattr(cls, 'pooled_out_type', '')
    if not out_type:
        raise UserError(
            f'the backbone {cls.__name__} has no pooled output for a '
            "classifier (its class sets no 'pooled_out_type')"
        )
    return out_type


def build_classifier(
    backbone: dict,
    num_classes: int = 1000,
    head: Optional[dict] = None,
    data_preprocessor: Optional[dict] = None,
) -> nn.Module:
    """mmpretrain's ``ImageClassifier``: an mmssm backbone's pooled feature
    and a ``LinearClsHead``.

    The model is the one a classification config builds (same modules, same
    state dict keys); ``model(x)`` returns the logits (mmpretrain's 'tensor'
    mode).

    Args:
        backbone (dict): The mmssm backbone's config (``type`` with or
            without the ``mmssm.`` prefix). Its ``out_type`` is set to the
            backbone's pooled type; another one is refused.
        num_classes (int): Classes. Defaults to 1000.
        head (dict, optional): More arguments of the ``LinearClsHead``
            (e.g. ``loss``, ``topk``); ``in_channels`` is the backbone's
            ``embed_dims``. Defaults to None.
        data_preprocessor (dict, optional): The classifier's
            ``ClsDataPreprocessor`` arguments. Defaults to None.

    Returns:
        nn.Module: The classifier, its head initialised as mmpretrain's
        (normal, std 0.01; the backbone initialises itself when built).
    """
    from mmpretrain.registry import MODELS as PRETRAIN_MODELS

    backbone = copy.deepcopy(dict(backbone))
    out_type = pooled_out_type(backbone['type'])
    if backbone.get('out_type', out_type) != out_type:
        raise UserError(
            f"a classifier's backbone must have out_type={out_type!r}, got "
            f'{backbone["out_type"]!r}'
        )
    backbone['out_type'] = out_type
    built = MODELS.build(backbone)
    head = dict(
        dict(type='LinearClsHead', topk=(1,)),
        **(head or {}),
        num_classes=num_classes,
        in_channels=built.embed_dims,
    )
    cfg = dict(
        type='ImageClassifier',
        backbone=built,
        head=head,
        data_preprocessor=dict(
            data_preprocessor or {}, num_classes=num_classes
        ),
    )
    # mmpretrain's scope for its own types (the head, the preprocessor)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = PRETRAIN_MODELS.build(cfg)
    # the head's own init_cfg, without init_weights' per-parameter log
    initialize(model.head, model.head.init_cfg)
    return model
