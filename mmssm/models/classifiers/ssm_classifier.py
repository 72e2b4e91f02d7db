"""An image classifier: an SSM backbone's pooled feature and a linear head.

Its state dict (``backbone.*``, ``head.fc.*``) is the layout of the official
PlainMamba and (after conversion) Vim ImageNet checkpoints.
"""

import copy
from typing import List, Optional, Union

import torch.nn as nn
from mmengine.model import BaseModule
from torch import Tensor

from mmssm.registry import MODELS


class LinearHead(nn.Module):
    """A linear classifier ``fc`` (so that its keys are ``fc.*``).

    Args:
        in_channels (int): Feature channels.
        num_classes (int): Classes.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)  # as mmpretrain's head
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


def pooled_out_type(backbone_type: Union[str, type]) -> str:
    """The ``out_type`` of a backbone that gives a pooled (B, C) vector.

    Args:
        backbone_type (str | type): The registered name (scope prefix
            allowed) or the class.

    Returns:
        str: E.g. 'avg_featmap' for PlainMamba, 'cls_token' for Vim.
    """
    cls = (
        MODELS.get(backbone_type)
        if isinstance(backbone_type, str)
        else backbone_type
    )
    if cls is None:
        raise KeyError(
            f'backbone type {backbone_type!r} is not registered '
            f'in mmssm.registry.MODELS'
        )
    out_type = getattr(cls, 'pooled_out_type', '')
    if not out_type:
        raise ValueError(
            f'no pooled out_type is known for the backbone '
            f'{cls.__name__}; give the class a '
            f"'pooled_out_type' attribute"
        )
    return out_type


@MODELS.register_module()
class SSMClassifier(BaseModule):
    """Backbone -> pooled feature (B, C) -> ``head.fc`` -> logits.

    Args:
        backbone (dict): Config of the backbone, built with
            ``MODELS.build``. Its ``out_type`` is set to the backbone's
            pooled type (its class attribute ``pooled_out_type``); the last
            of its outputs is classified.
        num_classes (int): Classes. Defaults to 1000.
        in_channels (int, optional): Feature channels; None takes the
            backbone's ``embed_dims``. Defaults to None.
        init_cfg (dict | list[dict], optional): Initialisation config.
            Defaults to None.
    """

    def __init__(
        self,
        backbone: dict,
        num_classes: int = 1000,
        in_channels: Optional[int] = None,
        init_cfg: Optional[Union[dict, List[dict]]] = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        backbone = copy.deepcopy(dict(backbone))
        out_type = pooled_out_type(backbone['type'])
        if backbone.get('out_type', out_type) != out_type:
            raise ValueError(
                f"the backbone's out_type must be {out_type!r} "
                f'in a classifier, got '
                f'{backbone["out_type"]!r}'
            )
        backbone['out_type'] = out_type
        self.backbone = MODELS.build(backbone)
        embed_dims = getattr(self.backbone, 'embed_dims', None)
        if in_channels is None:
            if embed_dims is None:
                raise ValueError(
                    'in_channels is None and the backbone has '
                    'no embed_dims to infer it from'
                )
            in_channels = int(embed_dims)
        elif embed_dims is not None and in_channels != embed_dims:
            raise ValueError(
                f'in_channels ({in_channels}) differs from the '
                f"backbone's embed_dims ({embed_dims})"
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.head = LinearHead(in_channels, num_classes)

    def extract_feat(self, inputs: Tensor) -> Tensor:
        """The pooled feature (B, C) of the backbone's last output."""
        return self.backbone(inputs)[-1]

    def forward(self, inputs: Tensor) -> Tensor:
        """Classify images.

        Args:
            inputs (Tensor): Images (B, 3, H, W).

        Returns:
            Tensor: Logits (B, num_classes).
        """
        return self.head(self.extract_feat(inputs))
