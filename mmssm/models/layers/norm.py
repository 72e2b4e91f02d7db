"""Normalisation layers and the one norm builder of the models.

The usual types are built here so that mmcv is not needed to build the
backbones; any other type goes to mmcv's ``build_norm_layer``.
"""

import torch
import torch.nn as nn
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def upcast(t: Tensor) -> Tensor:
    """Half/bfloat16 to float32; float32 and float64 stay as they are."""
    return t.float() if t.dtype in _LOW_PRECISION else t


class RMSNorm(nn.Module):
    """Root-mean-square norm, ``x / sqrt(mean(x^2) + eps) * weight``.

    Computed in float32 (float64 for float64 inputs), as mamba-ssm's
    ``rms_norm_fn``; the output has the dtype of the input.

    Args:
        num_features (int): Channels (the last dimension).
        eps (float): Added to the mean square. Defaults to 1e-5.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        xf = upcast(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * upcast(self.weight)).to(x.dtype)

    def extra_repr(self) -> str:
        return f'{self.weight.shape[0]}, eps={self.eps}'


_NORM_TYPES = {
    'BN': nn.BatchNorm2d,
    'BN2d': nn.BatchNorm2d,
    'SyncBN': nn.SyncBatchNorm,
    'LN': nn.LayerNorm,
    'LayerNorm': nn.LayerNorm,
    'GN': nn.GroupNorm,
    'RMSNorm': RMSNorm,
}

# The norms that work on a (B, L, C) token sequence.
TOKEN_NORM_TYPES = ('RMSNorm', 'LN', 'LayerNorm')


def build_norm(cfg: dict, num_features: int) -> nn.Module:
    """Build a normalisation layer from a config, as mmcv does.

    'BN', 'BN2d', 'SyncBN', 'LN' ('LayerNorm'), 'GN' and 'RMSNorm' are built
    here (so that mmcv is not needed); any other type goes to mmcv's
    ``build_norm_layer``.

    Args:
        cfg (dict): ``type`` plus the layer's keyword arguments, and
            optionally ``requires_grad`` (default True).
        num_features (int): Channels to normalise.

    Returns:
        nn.Module: The layer.
    """
    cfg = dict(cfg)
    norm_type = cfg.pop('type')
    requires_grad = cfg.pop('requires_grad', True)
    if norm_type in _NORM_TYPES:
        if norm_type == 'GN':
            layer = nn.GroupNorm(num_channels=num_features, **cfg)
        else:
            layer = _NORM_TYPES[norm_type](num_features, **cfg)
    else:
        try:
            from mmcv.cnn import build_norm_layer
        except ImportError as e:
            raise ValueError(
                f'norm type {norm_type!r} needs mmcv, which '
                f'cannot be imported ({e})'
            ) from e
        layer = build_norm_layer(
            dict(cfg, type=norm_type, requires_grad=requires_grad),
            num_features,
        )[1]
    for param in layer.parameters():
        param.requires_grad = requires_grad
    return layer


def build_token_norm(norm_cfg: dict, num_features: int) -> nn.Module:
    """:func:`build_norm` restricted to :data:`TOKEN_NORM_TYPES`.

    A batch or group norm would normalise over the wrong dimension of a
    (B, L, C) sequence, so it is refused here rather than built.

    Args:
        norm_cfg (dict): ``type`` plus the norm's keyword arguments
            (``eps``).
        num_features (int): Channels.

    Returns:
        nn.Module: The norm.
    """
    norm_type = norm_cfg.get('type')
    if norm_type not in TOKEN_NORM_TYPES:
        raise ValueError(
            "norm_cfg['type'] must be 'RMSNorm' or 'LN' for a token "
            f'sequence, got {norm_type!r}'
        )
    return build_norm(norm_cfg, num_features)
