"""Gradients have the strides of their parameters (DDP's layout check).

DDP copies each gradient into a bucket view made with the parameter's
strides, and warns "Grad strides do not match bucket view strides" (then
copies at every step) when they differ, size-1 dimensions included. A
convolution fed a channels-last view (a transposed token map) gets a
channels-last weight gradient: the backbones and the adapter hand their
convolutions, and the necks, contiguous NCHW maps.
"""

import pytest
import torch

from mmssm.models.backbones import ViTAdapter
from mmssm.testing import TINY_PRUNE, tiny_backbone_cfg


def _mismatches(module):
    return [
        (name, tuple(p.stride()), tuple(p.grad.stride()))
        for name, p in module.named_parameters()
        if p.grad is not None and p.grad.stride() != p.stride()
    ]


@pytest.mark.parametrize('family', ['plainmamba', 'vim'])
@pytest.mark.parametrize('prune', [False, True])
def test_adapter_and_neck_grads_have_the_parameters_strides(family, prune):
    arch = dict(embed_dims=32)
    if family == 'vim':
        arch['cls_token'] = None
    backbone = tiny_backbone_cfg(
        family, arch, prune_cfg=dict(TINY_PRUNE) if prune else None
    )
    torch.manual_seed(0)
    model = ViTAdapter(
        backbone=backbone,
        conv_inplane=8,
        deform_num_heads=2,
        init_values=0.1,
    )
    # a 1x1 conv per output, as the lateral convs of FPN and UperNet
    necks = torch.nn.ModuleList(torch.nn.Conv2d(32, 8, 1) for _ in range(4))
    outs = model(torch.randn(2, 3, 64, 80))
    sum(neck(o).square().mean() for neck, o in zip(necks, outs)).backward()
    assert not _mismatches(model)
    assert not _mismatches(necks)
    assert all(o.is_contiguous() for o in outs)


def test_the_check_can_fail():
    """A channels-last input does give a depthwise conv such gradients."""
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    x = torch.randn(2, 16, 16, 8).permute(0, 3, 1, 2)  # channels last
    conv(x).sum().backward()
    assert _mismatches(conv)
