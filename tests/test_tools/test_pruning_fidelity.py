"""tools/analysis_tools/pruning_fidelity.py: a tiny run and its parts."""

import json
import os.path as osp

import pytest
import torch

TOOL = osp.join('tools', 'analysis_tools', 'pruning_fidelity.py')

# Tiny settings: 16 tokens, 3 layers of 16 channels, one step of training.
TINY = [
    '--image-size', '64',
    '--num-train', '16',
    '--num-test', '8',
    '--epochs', '1',
    '--depth', '3',
    '--embed-dims', '16',
    '--batch-size', '16',
    '--threads', '1',
]  # fmt: skip


@pytest.fixture(scope='module')
def tool(tools):
    return tools.load_script(TOOL)


def test_schedule(tool):
    sched = tool.schedule(6, 0.6)
    assert sched['layers'] == (2, 4)
    assert sched['keep_ratios'] == pytest.approx((0.6**0.5,) * 2)
    assert tool.schedule(24, 0.6)['layers'] == (8, 16)
    assert tool.schedule(3, 0.5)['layers'] == (1, 2)
    with pytest.raises(ValueError):
        tool.schedule(2, 0.6)


@pytest.mark.parametrize('model', ['plainmamba', 'vim'])
def test_tokens_kept(tool, model):
    """64 patch tokens -> 49 -> 37 at 0.6 (Vim's class token not counted),
    and the pruned model loads the dense weights strictly."""
    cfg = tool.backbone_cfg(model, 16, 6, 128)
    dense = tool.build_classifier(cfg, 6)
    pruned = tool.build_classifier(
        dict(cfg, prune_cfg=tool.schedule(6, 0.6)), 6
    )
    pruned.load_state_dict(dense.state_dict(), strict=True)
    images = torch.zeros(1, 3, 128, 128, dtype=torch.uint8)
    assert tool.tokens_kept(pruned, images) == (37, 64)


def test_patch_coverage(tool):
    masks = torch.zeros(1, 40, 40, dtype=torch.uint8)
    masks[0, :16, :16] = 255  # the first patch, whole
    masks[0, 16:24, 32:40] = 255  # half of the last patch of row 1
    cov = tool.patch_coverage(masks, (3, 3))  # padded to 48 x 48
    expected = torch.zeros(1, 9)
    expected[0, 0] = 1.0
    expected[0, 5] = 0.5 * 0.5  # 8 x 8 of 16 x 16
    assert torch.allclose(cov, expected)


@pytest.mark.parametrize('model', ['plainmamba', 'vim'])
def test_evaluate(tool, model):
    """The evaluation gives the classifier's logits; the 'oracle' reference
    (the 'given' scorer, fed the coverage) keeps the covered patches and
    the 'random' one does not; the step hook is removed afterwards."""
    cfg = tool.backbone_cfg(model, 16, 3, 64)  # 4 x 4 grid
    sched = tool.schedule(3, 0.25)  # 16 -> 8 -> 4 tokens

    def classifier(metric):
        prune_cfg = dict(sched, scorer=tool.scorer_cfg(metric, 0))
        torch.manual_seed(0)
        backbone = dict(cfg, prune_cfg=prune_cfg)
        return tool.build_classifier(backbone, 6).eval()

    clf = classifier('clip')
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        labels = clf(tool.normalise(images)).argmax(1)
    coverage = torch.zeros(3, 16)
    coverage[:, [1, 6, 9, 14]] = 1.0  # 4 object patches per image
    top1, kept = tool.evaluate(clf, images, labels, coverage, 2)
    assert top1 == 100.0 and 0 <= kept <= 100
    assert not clf.backbone.pruner._step_hooks
    _, kept = tool.evaluate(classifier('oracle'), images, labels, coverage, 2)
    assert kept == 100.0
    _, kept = tool.evaluate(classifier('random'), images, labels, coverage, 2)
    assert kept < 100.0


def test_no_decay_rule(tool):
    """The SSM constructor spares norms, biases and the tagged parameters
    (A_log, D, pos_embed, the class token) from weight decay, and decays
    the other weights."""
    cfg = tool.backbone_cfg('vim', 16, 3, 64)
    clf = tool.build_classifier(cfg, 6)
    groups = tool.build_optim_wrapper(clf, 1e-3).optimizer.param_groups
    decay = {id(p): g['weight_decay'] for g in groups for p in g['params']}
    for name, p in clf.named_parameters():
        spared = p.ndim <= 1 or getattr(p, '_no_weight_decay', False)
        assert (decay[id(p)] == 0) == spared, name


def test_finetune(tool):
    """Fine-tuning trains the pruned model in place (pruning in training)
    for --finetune-epochs at --finetune-lr, then evaluates it."""
    from mmssm.datasets.synthetic_cls import make_synthetic_cls

    args = tool.parse_args(TINY + ['--finetune-epochs', '2'])
    cfg = tool.backbone_cfg('plainmamba', 16, 3, 64)
    model = tool.build_classifier(
        dict(cfg, prune_cfg=tool.schedule(3, 0.6)), 6
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = make_synthetic_cls(16, 64, 0, 'train')
    images, labels, masks = make_synthetic_cls(8, 64, 0, 'test', True)
    test = (images, labels, tool.patch_coverage(masks, (4, 4)), 16)
    seen = []
    model.backbone.pruner.register_step_hook(
        lambda p, step, before, after, scores: seen.append(p.training)
    )
    top1, cpu = tool.finetune(model, dict(train=train), test, args)
    assert 0 <= top1 <= 100 and cpu > 0
    assert seen[:2] == [True, True]  # 2 steps of training, pruned
    changed = [k for k, v in model.state_dict().items()
               if not torch.equal(v, before[k])]  # fmt: skip
    assert 'head.fc.weight' in changed
    assert any(k.startswith('backbone.layers.') for k in changed)


def test_bad_arguments(tool):
    for argv in (
        ['--depth', '2'],
        ['--keep', '0'],
        ['--epochs', '0'],
        ['--finetune-epochs', '-1'],
    ):
        with pytest.raises(SystemExit):
            tool.parse_args(argv)


def test_tiny_run(tools, tmp_path):
    out = tmp_path / 'fidelity.json'
    result = tools.run(
        [TOOL, *TINY, '--out', str(out), '--finetune-epochs', '1',
         '--metrics', 'clip', 'oracle'],
        timeout=120,
    )  # fmt: skip
    tools.check_ok(result)
    header = (
        "| model | metric | dense top-1 | naive | aligned 'prev' "
        "| aligned 'null' | tokens kept | object tokens kept"
    )
    assert header in result.stdout
    assert '| plainmamba | clip |' in result.stdout
    assert "| 'prev' ft | aligned 'null' | 'null' ft |" in result.stdout
    assert '| vim | clip |' in result.stdout
    assert 'trained in' in result.stdout
    report = json.loads(out.read_text())
    assert report['settings']['epochs'] == 1
    for model in ('plainmamba', 'vim'):
        res = report['results'][model]
        assert res['train_time_s'] >= 0 and len(res['train_losses']) == 1
        assert 0 <= res['dense'] <= 100
        entry, oracle = res['pruned']
        assert entry['layers'] == [1, 2] and entry['metric'] == 'clip'
        # fine-tuned: the dense reference and each variant of 'clip'; the
        # 'oracle' selection is not trained (it scores test images only)
        assert 0 <= res['dense_ft'] <= 100 and res['finetune_cpu_s'] > 0
        assert all(0 <= entry[f'{v}_ft'] <= 100 for v in ('naive', 'prev'))
        assert 'null_ft' in entry and 'naive_ft' not in oracle
        # 4 x 4 grid at 0.6: 16 -> 12 -> 9 patch tokens
        assert (entry['tokens_kept'], entry['tokens']) == (9, 16)
        for name in ('naive', 'prev', 'null'):
            assert 0 <= entry[name] <= 100
            assert 0 <= entry[f'{name}_object_kept'] <= 100
