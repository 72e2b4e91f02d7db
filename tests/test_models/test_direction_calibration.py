"""Calibrating the eval threshold of DyVM's direction gates to a budget.

Rules checked: after :func:`calibrate_direction_gates` the kept fraction of
the gate bits on the same batches equals the target within one bit's share
(measured independently, by :func:`measure_direction_keep`); ``keep_before``
is what the gates' threshold 0 gives; at the calibrated threshold the gates
really skip (the eval output equals the training-mode multiply by the same
bits); the tool runs on the mini DyVM config from a checkpoint and the
``--cfg-options`` it prints build a model whose gates carry the threshold;
bad targets and models without gates give one-line errors.
"""

import argparse
import importlib.util
import json
import os.path as osp

import pytest
import torch
from mmengine.config import Config, DictAction
from mmengine.registry import DefaultScope

from mmssm.errors import UserError
from mmssm.models.layers.direction_gate import (
    DirectionGate,
    calibrate_direction_gates,
)
from mmssm.registry import MODELS
from mmssm.testing import tiny_backbone_cfg
from mmssm.utils.flops import measure_direction_keep

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOL = osp.join(
    ROOT, 'tools', 'analysis_tools', 'calibrate_direction_gates.py'
)
MINI = osp.join(
    ROOT, 'configs', 'dyvm', 'dyvm_vim-mini_1xb8-2e_synthetic-cls-128.py'
)
F64 = torch.float64


def gates_of(model):
    return [m for m in model.modules() if isinstance(m, DirectionGate)]


def randomise_gates(model, seed=0):
    """Gate heads whose logits differ between images, layers and
    directions, about half of them above 0 (the init, weight 0 and bias 5,
    gives every bit the same logit)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gates_of(model):
            w, b = gate.fc.weight, gate.fc.bias
            w.copy_(torch.randn(w.shape, generator=gen, dtype=w.dtype))
            b.copy_(0.5 + torch.randn(b.shape, generator=gen, dtype=b.dtype))
    return model


def gated_backbone(family, seed=0, arch=None):
    torch.manual_seed(seed)
    cfg = tiny_backbone_cfg(family, arch, direction_gate=True)
    model = MODELS.build(cfg)
    return randomise_gates(model, seed).to(F64)


def batches_of(num, seed=0, batch=4):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, 3, 64, 64, generator=gen, dtype=F64)
        for _ in range(num)
    ]


@pytest.mark.parametrize('family', ['vim', 'plainmamba'])
@pytest.mark.parametrize('target', [0.6, 0.85])
def test_calibration_hits_the_target(family, target):
    # without a class token Vim's gates read the mean token: every bit
    # depends on its image (see test_class_token_ties for the other case)
    arch = dict(cls_token=None) if family == 'vim' else None
    model = gated_backbone(family, arch=arch)
    batches = batches_of(3)
    uncalibrated = measure_direction_keep(model, batches)  # threshold 0
    result = calibrate_direction_gates(model, batches, target)
    assert result['keep_before'] == uncalibrated
    n_dir = 2 if family == 'vim' else 4
    assert result['num_bits'] == 12 * model.num_layers * n_dir
    share = 1 / result['num_bits']
    assert abs(result['keep_after'] - target) <= share + 1e-12
    # far from the target before, so the threshold moved
    assert abs(uncalibrated - target) > share
    assert result['threshold_logit'] != 0.0
    assert {g.threshold_logit for g in gates_of(model)} == {
        result['threshold_logit']
    }
    # an independent measurement of the calibrated model agrees
    assert measure_direction_keep(model, batches) == result['keep_after']
    assert model.training  # built in training mode, restored


@pytest.mark.parametrize('target', [0.6, 0.85])
def test_class_token_ties(target):
    """Vim's first gate reads the class token before any image enters it:
    one logit per direction for every image, so its bits go on or off
    together and the keep lands on the nearest cut between them."""
    model = gated_backbone('vim')
    batches = batches_of(3)
    result = calibrate_direction_gates(model, batches, target)
    model.eval()
    model(batches[0])
    first = model.aux_outputs['direction_gates'][0]
    assert torch.equal(first, first[:1].expand_as(first))
    group = 12 / result['num_bits']  # the 12 images of one such logit
    assert abs(result['keep_after'] - target) <= group / 2 + 1e-12
    assert measure_direction_keep(model, batches) == result['keep_after']


def test_keep_before_reads_each_gates_threshold():
    """``keep_before`` is measured at the thresholds the gates had, and a
    target of 1 turns every bit on."""
    model = gated_backbone('vim', seed=1)
    batches = batches_of(2, seed=1)
    for gate in gates_of(model):
        gate.threshold_logit = -1.0
    expected = measure_direction_keep(model, batches)
    result = calibrate_direction_gates(model, batches, 1.0)
    assert result['keep_before'] == expected
    assert result['keep_after'] == 1.0
    assert measure_direction_keep(model, batches) == 1.0


@pytest.mark.parametrize('family', ['vim', 'plainmamba'])
def test_calibrated_gates_skip(family, monkeypatch):
    """At the calibrated threshold a direction runs only on the images
    whose bit is on: the eval output equals the training-mode gates'
    multiply by the same bits (their logistic noise fixed at ``-T``, so
    ``l + noise > 0`` iff ``l > T``)."""
    model = gated_backbone(family, seed=2)
    batches = batches_of(2, seed=2)
    result = calibrate_direction_gates(model, batches, 0.5)
    threshold = result['threshold_logit']
    x = batches[0]
    model.eval()
    skipped = model(x)
    bits = torch.cat(model.aux_outputs['direction_gates'], 1)
    assert 0 < bits.sum() < bits.numel()
    # some direction runs on part of the batch only: the subset path
    assert bool(((bits.sum(0) > 0) & (bits.sum(0) < x.shape[0])).any())
    u = torch.sigmoid(torch.tensor(-threshold, dtype=F64))
    monkeypatch.setattr(torch, 'rand_like', lambda t: torch.full_like(t, u))
    for gate in gates_of(model):
        gate.train()
    multiplied = model(x)
    assert torch.equal(
        torch.cat(model.aux_outputs['direction_gates'], 1), bits
    )
    for a, b in zip(skipped, multiplied):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('target', [0, -0.1, 1.5, float('nan')])
def test_bad_target(target):
    model = gated_backbone('vim')
    with pytest.raises(UserError, match='target') as info:
        calibrate_direction_gates(model, batches_of(1), target)
    assert '\n' not in str(info.value)


def test_model_without_gates():
    model = MODELS.build(tiny_backbone_cfg('vim'))
    with pytest.raises(UserError, match='no direction gates') as info:
        calibrate_direction_gates(model, batches_of(1), 0.8)
    assert '\n' not in str(info.value)
    assert 'direction_gate=True' in str(info.value)


def load_tool():
    spec = importlib.util.spec_from_file_location('calibrate_tool', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_classifier(cfg):
    """The config's classifier, as the Runner builds it (in the config's
    default scope, restored afterwards)."""
    from mmpretrain.registry import MODELS as PRETRAIN_MODELS

    model_cfg = cfg.model
    model_cfg.setdefault('data_preprocessor', cfg.get('data_preprocessor'))
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        return PRETRAIN_MODELS.build(model_cfg)


def parse_options(options):
    """``--cfg-options`` as the tools' command line parses them."""
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args(['--cfg-options', *options]).cfg_options


def test_tool_end_to_end(tmp_path, capsys):
    from mmssm.datasets import write_synthetic_cls

    root = str(tmp_path / 'set') + '/'
    assert write_synthetic_cls(root, 4, 16, image_size=128, seed=1)
    data = {
        f'{k}_dataloader.dataset.data_root': root
        for k in ('train', 'val', 'test')
    }
    cfg = Config.fromfile(MINI)
    cfg.merge_from_dict(data)
    torch.manual_seed(0)
    model = randomise_gates(build_classifier(cfg))
    checkpoint = str(tmp_path / 'model.pth')
    torch.save({'state_dict': model.state_dict()}, checkpoint)
    out = tmp_path / 'calibration.json'
    options = [f'{k}={v}' for k, v in data.items()]
    tool = load_tool()
    argv = [MINI, checkpoint, '--work-dir', str(tmp_path / 'work')]
    argv += ['--target', '0.7', '--num-batches', '2', '--out', str(out)]
    # the tool's Runner sets mmpretrain's default scope for good: undone
    # after it, as other tests build mmssm models by unscoped names
    with DefaultScope.overwrite_default_scope('mmssm'):
        result = tool.main([*argv, '--cfg-options', *options])
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved == result
    assert saved['num_batches'] == 2 and saved['split'] == 'val'
    # 16 images, 8 layers, 2 directions
    assert saved['num_bits'] == 16 * 8 * 2
    # within half the share of a first-layer tie (one class-token logit
    # for the 16 images), see test_class_token_ties
    assert abs(saved['keep_after'] - 0.7) <= 8 / saved['num_bits']
    assert saved['keep_before'] != saved['keep_after']
    threshold = saved['threshold_logit']
    assert f'threshold_logit: {threshold!r}' in printed
    line = next(s for s in printed.splitlines() if '--cfg-options' in s)
    printed_options = line.split('--cfg-options ', 1)[1].split()
    assert printed_options == saved['options']
    # the printed override builds a model whose gates carry the threshold
    cfg = Config.fromfile(MINI)
    cfg.merge_from_dict(parse_options(printed_options))
    calibrated = build_classifier(cfg)
    gates = gates_of(calibrated.backbone)
    assert len(gates) == 8
    assert {g.threshold_logit for g in gates} == {threshold}
    # bad input: one line naming the argument
    with (
        DefaultScope.overwrite_default_scope('mmssm'),
        pytest.raises(SystemExit, match=r'^error: --target') as info,
    ):
        tool.main([*argv[:4], '--target', '1.5'])
    assert '\n' not in str(info.value)
