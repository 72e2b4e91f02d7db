"""The DyVM configs (configs/dyvm): released recipes, learned pruners of
each arch, teacher from load_from; each builds (shrunk) and trains one
step of its losses."""

import glob
import os.path as osp
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

import mmssm.models.classifiers.dyvm_classifier  # noqa: F401 (registers)
from mmssm.models.pruning import build_token_pruner
from mmssm.registry import MODELS
from mmssm.testing import tiny_arch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIGS = sorted(
    p for p in glob.glob(osp.join(ROOT, 'configs', 'dyvm', '*_in1k.py'))
)
# Vim: released lr per batch of 512 (T 3e-5, S and B 5e-5) and rho
RELEASED = {'tiny': (3e-5, 0.8), 'small': (5e-5, 0.8), 'base': (5e-5, 0.7)}
DEPTH = {'tiny': 24, 'small': 24, 'base': 24, 'l1': 24, 'l2': 24, 'l3': 36}


def _name(path):
    return osp.basename(path)[:-3]


def test_every_arch_and_variant_is_there():
    names = {_name(p) for p in CONFIGS}
    for arch in ('vim-t', 'vim-s', 'vim-b'):
        batch = {'vim-t': 64, 'vim-s': 32, 'vim-b': 16}[arch]
        for align in ('', '-align'):
            assert f'dyvm_{arch}{align}_8xb{batch}-30e_in1k' in names
    for arch in ('l1', 'l2', 'l3'):
        for align in ('', '-align'):
            assert f'dyvm_plainmamba-{arch}{align}_8xb64-30e_in1k' in names


@pytest.mark.parametrize('path', CONFIGS, ids=_name)
def test_recipe(path):
    cfg = Config.fromfile(path)
    model = cfg.model
    assert model.type == 'mmssm.DyVMClassifier'
    backbone = model.backbone
    family = 'vim' if backbone.type == 'mmssm.Vim' else 'plainmamba'
    arch = backbone.arch
    assert backbone.direction_gate is True
    assert model.teacher.checkpoint == cfg.load_from
    assert (
        arch.replace('tiny', 't').replace('small', 's').replace('base', 'b')
        in cfg.load_from
    )
    pruner = build_token_pruner(
        backbone.prune_cfg, DEPTH[arch], family, arch, embed_dims=64
    )
    assert pruner.align == ('-align' in _name(path))
    assert pruner.gap_mode == 'null'
    quarter = {'l1': 3, 'l2': 6, 'l3': 9}.get(arch, 6)
    assert pruner.layers == (quarter, 2 * quarter, 3 * quarter)
    r = 0.9 if arch == 'tiny' else 0.7
    assert pruner.keep_ratios == pytest.approx((r, r**2, r**3))
    # the schedule: AdamW wd 1e-8, 5 warm-up epochs from 1e-5, cosine to
    # 1e-6 at epoch 30; lr scaled by the total batch / 512
    total = 8 * int(re.search(r'_8xb(\d+)-', path).group(1))
    assert cfg.train_dataloader.batch_size * 8 == total
    assert cfg.auto_scale_lr.base_batch_size == total
    optimizer = cfg.optim_wrapper.optimizer
    assert optimizer.type == 'AdamW' and optimizer.weight_decay == 1e-8
    warmup, cosine = cfg.param_scheduler
    assert warmup.type == 'LinearLR' and (warmup.begin, warmup.end) == (0, 5)
    assert warmup.start_factor * optimizer.lr == pytest.approx(1e-5)
    assert cosine.type == 'CosineAnnealingLR' and cosine.eta_min == 1e-6
    assert (cosine.begin, cosine.end) == (5, 30)
    assert cfg.train_cfg.max_epochs == 30
    assert 'clip_grad' not in cfg.optim_wrapper
    assert model.distill_kl_loss.loss_weight == 0.5
    assert model.distill_tokens_loss.loss_weight == 0.5
    assert model.token_ratio_loss.loss_weight == 10.0
    assert model.direction_ratio_loss.loss_weight == 10.0
    if family == 'vim':
        lr, rho = RELEASED[arch]
        assert optimizer.lr == pytest.approx(lr * total / 512)
        assert model.direction_ratio_loss.target == rho


@pytest.mark.parametrize(
    'path',
    [p for p in CONFIGS if 'vim-s' in p or 'plainmamba-l1' in p],
    ids=_name,
)
def test_builds_shrunk_and_trains_a_step(path):
    cfg = Config.fromfile(path)
    model = cfg.model.to_dict()
    family = (
        'vim' if model['backbone']['type'] == 'mmssm.Vim' else ('plainmamba')
    )
    model['backbone'].update(
        arch=tiny_arch(family),
        img_size=64,
        prune_cfg=dict(
            model['backbone']['prune_cfg'],
            schedule=None,
            layers=(1, 2),
            keep_ratios=0.7,
        ),
    )
    model['backbone']['prune_cfg'].pop('schedule')
    model['head'].update(in_channels=16, num_classes=3)
    model['teacher'] = dict(checkpoint=None)
    model['train_cfg'] = None  # batch augments need the preprocessor
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        built = MODELS.build(model)
        built.init_weights()
        from mmpretrain.structures import DataSample

        samples = [DataSample().set_gt_label(i) for i in (0, 1)]
        losses = built.train().loss(torch.randn(2, 3, 64, 64), samples)
    assert {
        'loss_cls',
        'loss_token_ratio',
        'loss_direction_ratio',
        'loss_distill_kl',
        'loss_distill_tokens',
    } <= set(losses)
    sum(v for k, v in losses.items() if k.startswith('loss')).backward()
