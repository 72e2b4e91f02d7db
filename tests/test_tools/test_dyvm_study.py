"""tools/analysis_tools/dyvm_study.py: each method's config (matched
schedule, the same fine-tuning budget, DyVM's losses only for DyVM) and
the kept-token picture."""

import argparse

import mmcv
import numpy as np
import pytest
import torch


@pytest.fixture(scope='module')
def study(tools):
    return tools.load_script('tools/analysis_tools/dyvm_study.py')


def test_method_configs(study, tmp_path):
    args = study.parse_args(['--work-dir', str(tmp_path), '--ft-epochs', '2'])
    assert isinstance(args, argparse.Namespace)
    cfgs = {
        name: study.make_cfg(args, name, 'dense.pth') for name in study.METHODS
    }
    assert cfgs['dense'].model.backbone.prune_cfg is None
    assert cfgs['dense'].train_cfg.max_epochs == 10
    for name, cfg in cfgs.items():
        model = cfg.model
        assert model.backbone.direction_gate is False
        assert model.direction_ratio_loss is None
        assert model.train_cfg is None  # no Mixup/CutMix without --mixup
        if name == 'dense':
            continue
        assert cfg.load_from == 'dense.pth'
        assert cfg.train_cfg.max_epochs == 2
        assert cfg.optim_wrapper.optimizer.lr == args.ft_lr
        prune = model.backbone.prune_cfg
        assert tuple(prune.layers) == (2, 4, 6) and prune.keep_ratios == 0.7
        dyvm = name.startswith('dyvm')
        assert (model.teacher is not None) == dyvm
        assert (model.token_ratio_loss is not None) == dyvm
        # the pruners' defaults: ToP aligned, DyVM rearranged
        align = prune.get('align', prune.type == 'mmssm.TokenPruner')
        assert align == (name in ('top-zero-shot', 'top-ft', 'dyvm-align'))
    assert cfgs['dyvm'].model.teacher.checkpoint == 'dense.pth'


def test_kept_token_picture(study, tmp_path):
    images = [torch.randint(0, 255, (3, 128, 128), dtype=torch.uint8)] * 2
    maps = {'a': np.ones((2, 8, 8), bool), 'b': np.zeros((2, 8, 8), bool)}
    path = str(tmp_path / 'maps.png')
    study.draw(images, maps, ['a', 'b'], path)
    picture = mmcv.imread(path)
    assert picture.shape == (256, 3 * 128 + 2 * 4, 3)
    first = images[0].permute(1, 2, 0).numpy()
    assert (picture[:128, 132:260] == first).all()  # all kept: unchanged
    assert picture[:128, 264:].max() < first.max()  # all pruned: darker
