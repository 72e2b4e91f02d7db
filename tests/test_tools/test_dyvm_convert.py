"""tools/model_converters/dyvm2mmssm.py on a checkpoint built in the
released DyVM-Vim layout: the converted file loads strictly into the DyVM
classifier and gives its outputs; an unmapped key is an error that names
it."""

import argparse
import re

import pytest
import torch
from mmengine.registry import DefaultScope

import mmssm.models.classifiers.dyvm_classifier  # noqa: F401 (registers)
from mmssm.registry import MODELS
from mmssm.testing import tiny_backbone_cfg
from mmssm.utils.checkpoint import load_checkpoint_strict


def build():
    cfg = dict(
        type='mmssm.DyVMClassifier',
        backbone=tiny_backbone_cfg(
            'vim',
            out_type='cls_token',
            prune_cfg=dict(
                type='mmssm.LearnedTokenPruner', layers=(1, 2), keep_ratios=0.7
            ),
            direction_gate=True,
        ),
        head=dict(type='LinearClsHead', num_classes=5, in_channels=16),
        teacher=None,
        distill_kl_loss=None,
        distill_tokens_loss=None,
    )
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(cfg)


def released_layout(state_dict):
    """Our keys -> the keys of NUS-HPC-AI-Lab/DyVM's classifiers."""
    out = {}
    for key, value in state_dict.items():
        key = re.sub(
            r'^backbone\.pruner\.scorer\.predictors\.',
            'score_predictors.',
            key,
        )
        key = key.replace('.mixer.direction_gate.fc.', '.mixer.block_head.')
        key = re.sub(r'^backbone\.', '', key)
        key = re.sub(r'^head\.fc\.', 'head.', key)
        out[key] = value
    return out


@pytest.fixture
def released(tmp_path):
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = released_layout(model.state_dict())
    assert 'score_predictors.1.out_conv.4.weight' in state
    assert 'layers.3.mixer.block_head.bias' in state
    assert 'head.weight' in state and 'norm_f.weight' in state
    src = tmp_path / 'dyvm_vim_tiny.pth'
    torch.save(dict(model=state, args=argparse.Namespace(lr=1.0)), src)
    return model.eval(), src, state


def test_converted_checkpoint_gives_the_same_model(released, tools, tmp_path):
    model, src, _ = released
    dst = tmp_path / 'converted.pth'
    proc = tools.run(
        ['tools/model_converters/dyvm2mmssm.py', str(src), str(dst)]
    )
    tools.check_ok(proc)
    fresh = build().eval()
    load_checkpoint_strict(fresh, str(dst))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_unmapped_keys_are_listed(released, tools, tmp_path):
    _, src, state = released
    state = dict(
        state,
        **{'layers.0.mixer.gamma': torch.ones(1), 'rope.freqs': torch.ones(1)},
    )
    torch.save(dict(model=state), src)
    proc = tools.run(
        [
            'tools/model_converters/dyvm2mmssm.py',
            str(src),
            str(tmp_path / 'out.pth'),
        ]
    )
    assert proc.returncode == 1
    assert 'layers.0.mixer.gamma' in proc.stderr
    assert 'rope.freqs' in proc.stderr
    assert not (tmp_path / 'out.pth').exists()
