"""DyVM's auxiliary losses in the loss dict of any mmdet or mmseg model.

mmdet's detectors and mmseg's segmentors build their loss dict from their
heads only; the token-ratio and direction-ratio losses of a learned-pruning
mmssm backbone (DyVM, arXiv 2504.04787) live in the backbone's
``aux_outputs``. :class:`DyVMAuxLossHook`, a runner hook of the det and seg
runtimes, puts them there without a subclass of any detector or segmentor:
before training it registers a forward hook on the (unwrapped) model that,
for ``mode='loss'`` only, adds ``loss_token_ratio`` and
``loss_direction_ratio`` to the returned dict; the model's ``parse_losses``
then sums and logs them under their own names like any head's loss. The
kept fractions (``token_keep``, ``direction_keep``) are logged beside them.
A dense backbone (no learned pruner, no direction gates) gets nothing,
nor does a model that computes the losses itself (``DyVMClassifier``).
``mmssm.Runner`` adds the hook by default (``default_hooks.dyvm_aux_loss``,
whose fields are the loss configs; None removes it).
"""

from typing import Dict, Optional

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from torch import Tensor, nn

from mmssm.errors import UserError
from mmssm.registry import HOOKS, MODELS

#: DyVM's released segmentation losses (hard-coded there, defaults here).
DEFAULT_TOKEN_RATIO_LOSS = dict(type='mmssm.TokenRatioLoss', loss_weight=20.0)
DEFAULT_DIRECTION_RATIO_LOSS = dict(
    type='mmssm.DirectionRatioLoss', target=0.8, loss_weight=20.0
)


def find_ssm_backbone(model: nn.Module) -> Optional[nn.Module]:
    """The one mmssm SSM backbone of a model (e.g. ``backbone`` or, inside a
    ViT-Adapter, ``backbone.backbone``), or None.

    Raises:
        UserError: If the model has more than one.
    """
    from mmssm.models.backbones.base_backbone import SSMBackbone

    found = [m for m in model.modules() if isinstance(m, SSMBackbone)]
    if len(found) > 1:
        raise UserError(
            f'DyVMAuxLossHook found {len(found)} mmssm backbones in the '
            f'model; it supports one'
        )
    return found[0] if found else None


def dyvm_aux_losses(
    backbone: nn.Module,
    token_ratio_loss: Optional[nn.Module],
    direction_ratio_loss: Optional[nn.Module],
) -> Dict[str, Tensor]:
    """The auxiliary losses of the backbone's last forward.

    Args:
        backbone (nn.Module): An mmssm SSM backbone after a training
            forward (its ``aux_outputs`` and ``pruner``).
        token_ratio_loss (nn.Module, optional): Added if the backbone has a
            learned pruner (and the loss is not None).
        direction_ratio_loss (nn.Module, optional): Added if the backbone's
            layers reported direction gates.

    Returns:
        dict: ``loss_token_ratio`` and/or ``loss_direction_ratio``; empty
        for a dense backbone.
    """
    from mmssm.models.pruning import LearnedTokenPruner

    losses = {}
    aux = backbone.aux_outputs
    pruner = getattr(backbone, 'pruner', None)
    if token_ratio_loss is not None and isinstance(pruner, LearnedTokenPruner):
        losses['loss_token_ratio'] = token_ratio_loss(
            aux.get('token_decisions', []), pruner.keep_ratios
        )
    gates = aux.get('direction_gates', [])
    if direction_ratio_loss is not None and gates:
        losses['loss_direction_ratio'] = direction_ratio_loss(gates)
    return losses


def dyvm_keep_ratios(backbone: nn.Module) -> Dict[str, Tensor]:
    """What the backbone's last training forward kept, to log beside the
    losses (not losses: mmengine logs, but does not sum, keys without
    'loss').

    Returns:
        dict: ``token_keep``, the fraction of patch tokens kept after the
        last pruning step (its target is the last cumulative keep ratio),
        and ``direction_keep``, the fraction of scan directions run; each
        only if the backbone reported it.
    """
    aux = backbone.aux_outputs
    ratios = {}
    decisions = aux.get('token_decisions', [])
    if decisions:
        ratios['token_keep'] = decisions[-1].detach().mean()
    gates = aux.get('direction_gates', [])
    if gates:
        ratios['direction_keep'] = torch.stack(
            [g.detach().mean() for g in gates]
        ).mean()
    return ratios


@HOOKS.register_module()
class DyVMAuxLossHook(Hook):
    """Adds DyVM's token-ratio and direction-ratio losses of the model's
    mmssm backbone to its loss dict (see the module).

    Args:
        token_ratio_loss (dict, optional): Config of the token-ratio loss;
            None switches it off. Defaults to
            ``dict(type='mmssm.TokenRatioLoss', loss_weight=20.0)`` (DyVM's
            segmentation weight).
        direction_ratio_loss (dict, optional): Config of the
            direction-ratio loss; None switches it off. Defaults to
            ``dict(type='mmssm.DirectionRatioLoss', target=0.8,
            loss_weight=20.0)`` (DyVM's segmentation setting).
    """

    priority = 'NORMAL'
    #: Attributes of a model that computes the losses itself (left alone).
    OWN_LOSSES = ('token_ratio_loss', 'direction_ratio_loss')

    def __init__(
        self,
        token_ratio_loss: Optional[dict] = DEFAULT_TOKEN_RATIO_LOSS,
        direction_ratio_loss: Optional[dict] = DEFAULT_DIRECTION_RATIO_LOSS,
    ) -> None:
        self.token_ratio_loss = (
            None
            if token_ratio_loss is None
            else MODELS.build(token_ratio_loss)
        )
        self.direction_ratio_loss = (
            None
            if direction_ratio_loss is None
            else MODELS.build(direction_ratio_loss)
        )
        self._handle = None

    def register(self, model: nn.Module) -> bool:
        """Register the forward hook on ``model`` (unwrapped).

        Returns:
            bool: Whether it was registered (False: the model has no mmssm
            backbone, or one without learned pruning and direction gates).
        """
        self.remove()
        if is_model_wrapper(model):
            model = model.module
        backbone = find_ssm_backbone(model)
        if backbone is None or not self._is_dynamic(backbone):
            return False
        if any(hasattr(model, name) for name in self.OWN_LOSSES):
            return False  # computes them itself (mmssm.DyVMClassifier)

        def add_losses(module, args, kwargs, output):
            mode = kwargs.get('mode', args[2] if len(args) > 2 else None)
            if mode != 'loss' or not isinstance(output, dict):
                return output
            losses = dyvm_aux_losses(
                backbone, self.token_ratio_loss, self.direction_ratio_loss
            )
            twice = sorted(set(losses) & set(output))
            if twice:
                raise UserError(
                    f'DyVMAuxLossHook: the model already returns {twice}; '
                    f'set default_hooks.dyvm_aux_loss=None'
                )
            output.update(losses)
            output.update(dyvm_keep_ratios(backbone))
            return output

        self._handle = model.register_forward_hook(
            add_losses, with_kwargs=True
        )
        return True

    @staticmethod
    def _is_dynamic(backbone: nn.Module) -> bool:
        """A learned pruner or direction gates (what the losses train)."""
        from mmssm.models.layers.direction_gate import DirectionGate
        from mmssm.models.pruning import LearnedTokenPruner

        if isinstance(getattr(backbone, 'pruner', None), LearnedTokenPruner):
            return True
        return any(isinstance(m, DirectionGate) for m in backbone.modules())

    def remove(self) -> None:
        """Remove the forward hook (if registered)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def before_train(self, runner) -> None:
        self.register(runner.model)

    def after_train(self, runner) -> None:
        self.remove()
