"""mmssm.SSMOptimWrapperConstructor: which parameters get weight decay."""

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from torch import nn

import mmssm.engine  # noqa: F401  (registers the constructor)
from mmssm.models.layers import RMSNorm
from mmssm.registry import MODELS
from mmssm.testing import tiny_backbone_cfg

WD = 0.05


class _Toy(nn.Module):
    """Names that substring custom_keys get wrong."""

    def __init__(self):
        super().__init__()
        self.D = nn.Parameter(torch.ones(4))  # exact name 'D'
        self.D_b = nn.Parameter(torch.ones(4))
        self.Downsample = nn.Linear(4, 4)  # '.D' as a substring
        self.tagged = nn.Parameter(torch.ones(4, 4))
        self.tagged._no_weight_decay = True
        self.ln1 = nn.LayerNorm(4)  # a norm without 'norm' in its name
        self.rms = RMSNorm(4)  # a norm mmengine does not know
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def _decays(
    model, paramwise_cfg, constructor='mmssm.SSMOptimWrapperConstructor'
):
    wrapper = build_optim_wrapper(
        model,
        dict(
            type='OptimWrapper',
            constructor=constructor,
            optimizer=dict(type='AdamW', lr=1e-4, weight_decay=WD),
            paramwise_cfg=paramwise_cfg,
        ),
    )
    names = {id(p): n for n, p in model.named_parameters()}
    result = {}
    for group in wrapper.optimizer.param_groups:
        for p in group['params']:
            result[names[id(p)]] = group['weight_decay']
    assert set(result) == set(names.values())  # every parameter is optimised
    return result


def test_flags_names_norms_and_biases():
    decays = _decays(
        _Toy(),
        dict(norm_decay_mult=0.0, bias_decay_mult=0.0, no_decay_names=['D']),
    )
    no_decay = {n for n, wd in decays.items() if wd == 0}
    assert no_decay == {
        'D',  # by name
        'tagged',  # by flag
        'Downsample.bias',
        'stem.0.bias',  # biases
        'ln1.weight',
        'ln1.bias',
        'rms.weight',  # norms, RMSNorm included
        'stem.1.weight',
        'stem.1.bias',
    }
    assert decays['D_b'] == WD  # 'D' is matched exactly, not as a prefix
    assert decays['Downsample.weight'] == WD
    assert decays['stem.0.weight'] == WD


def test_substring_custom_keys_would_be_wrong():
    """What the constructor avoids: mmengine's '.D' also hits D_b."""
    model = nn.Module()
    model.block = _Toy()
    decays = _decays(
        model,
        dict(custom_keys={'.D': dict(decay_mult=0.0)}),
        constructor='DefaultOptimWrapperConstructor',
    )
    assert decays['block.D_b'] == 0 and decays['block.Downsample.weight'] == 0


def test_custom_keys_with_decay_mult_win():
    decays = _decays(
        _Toy(), dict(custom_keys={'tagged': dict(decay_mult=0.5)})
    )
    assert decays['tagged'] == pytest.approx(WD * 0.5)
    assert decays['D'] == WD  # no flag, no name rule


def test_flags_can_be_ignored():
    decays = _decays(_Toy(), dict(honour_no_decay_flags=False))
    assert decays['tagged'] == WD


def test_bad_names():
    with pytest.raises(ValueError, match='last component'):
        _decays(_Toy(), dict(no_decay_names=['mixer.D']))
    with pytest.raises(TypeError, match='sequence'):
        _decays(_Toy(), dict(no_decay_names='D'))


@pytest.mark.parametrize(
    'cfg, expected',
    [
        (
            tiny_backbone_cfg('plainmamba', dict(num_layers=2, expand=1)),
            {'A_log', 'D', 'direction_Bs', 'pos_embed'},
        ),
        (
            tiny_backbone_cfg('vim', dict(num_layers=2, expand=1)),
            {'A_log', 'A_b_log', 'D', 'D_b', 'pos_embed', 'cls_token'},
        ),
    ],
    ids=['plainmamba', 'vim'],
)
def test_backbone_ssm_parameters_get_no_decay(cfg, expected):
    """The flags set by the backbones, with no names in the config."""
    model = MODELS.build(cfg)
    decays = _decays(model, dict(norm_decay_mult=0.0, bias_decay_mult=0.0))
    leaves = {}
    for name, wd in decays.items():
        leaves.setdefault(name.split('.')[-1], set()).add(wd)
    for leaf in expected:
        assert leaves[leaf] == {0.0}, leaf
    # the weights of the linear layers keep their decay
    mixer = 'mamba' if cfg['type'] == 'mmssm.PlainMamba' else 'mixer'
    for leaf in ('in_proj', 'x_proj', 'out_proj'):
        assert decays[f'layers.0.{mixer}.{leaf}.weight'] == WD
