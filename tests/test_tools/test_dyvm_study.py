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
    args = study.parse_args(
        [
            '--work-dir',
            str(tmp_path),
            '--ft-epochs',
            '2',
            '--image-size',
            '128',
        ]
    )
    assert isinstance(args, argparse.Namespace)
    cfgs = {
        name: study.make_cfg(args, name, 'dense.pth') for name in study.METHODS
    }
    assert cfgs['dense'].model.backbone.prune_cfg is None
    assert cfgs['dense'].train_cfg.max_epochs == 8
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
        assert tuple(prune.layers) == (2, 4, 6)
        if prune.type == 'mmssm.LearnedTokenPruner':
            assert prune.keep_ratios == 0.7
        else:  # DyVM's counts at 128 x 128: 44, 31, 21 of 64
            assert prune.keep_ratios == pytest.approx(
                (44 / 64, 31 / 44, 21 / 31)
            )
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
    pruned = picture[:128, 264:].astype(float)  # all pruned: washed out
    assert (np.abs(pruned - (0.3 * first + 178.5)) <= 1).all()
    small = [image[:, :64, :64] for image in images]
    study.draw(small, {'a': maps['a']}, ['a'], path)
    picture = mmcv.imread(path)  # enlarged x2 to rows of 128 pixels
    assert picture.shape == (256, 2 * (2 * 64 + 4), 3)
    assert (picture[:128:2, :128:2] == small[0].permute(1, 2, 0).numpy()).all()


@pytest.mark.parametrize('size,patch', [(64, 16), (96, 16), (128, 16)])
def test_matched_flops(study, size, patch):
    """ToP keeps, step by step, the counts DyVM's learned pruner keeps."""
    from mmssm.models.pruning import TokenPruner

    M = (size // patch) ** 2
    counts = study.dyvm_counts(M)
    assert counts == [int(M * 0.7**s + 1e-9) for s in (1, 2, 3)]
    top = TokenPruner(
        layers=(2, 4, 6), num_layers=8, keep_ratios=study.matched_top_ratios(M)
    )
    kept = [M]
    for step in range(3):
        kept.append(top.num_keep(step, kept[-1]))
    assert kept[1:] == counts


def test_standard_errors_and_table(study):
    dense = np.array([1, 1, 1, 1, 0, 0, 1, 1], bool)
    same = dense.copy()
    worse = np.array([1, 0, 1, 0, 0, 0, 1, 1], bool)
    assert study.standard_errors(dense, dense) == (
        pytest.approx(100 * np.sqrt(0.75 * 0.25 / 8)),
        0.0,
    )
    se, se_diff = study.standard_errors(worse, dense)
    # paired: two of eight images lost, none gained
    diff = np.array([0, -1, 0, -1, 0, 0, 0, 0], float)
    assert se_diff == pytest.approx(100 * diff.std(ddof=1) / np.sqrt(8))
    assert se == pytest.approx(100 * np.sqrt(0.5 * 0.5 / 8))
    assert study.standard_errors(same, dense)[1] == 0.0
    args = study.parse_args(['--image-size', '64'])
    results = {
        name: dict(
            top1=75.0,
            se=1.5,
            diff=-2.0,
            se_diff=0.5,
            flops_g=0.004,
            seconds=3.0,
            kept=[11, 7, 5],
        )
        for name in study.METHODS
    }
    table = study.format_table(results, args).splitlines()
    assert len(table) == 2 + len(study.METHODS)
    assert '(of 16)' in table[0]
    assert table[4] == (
        '| ToP aligned, fine-tuned | 75.0 ± 1.5 | -2.0 ± 0.5 | 4.00 '
        '| 11/7/5 | 3 |'
    )
