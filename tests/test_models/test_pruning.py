"""Token pruning of the PlainMamba and Vim backbones (``prune_cfg``)."""

import dataclasses

import pytest
import torch

from mmssm.models.backbones import PlainMamba, Vim
from mmssm.models.pruning import (
    PAPER_SCHEDULES,
    TokenPruner,
    TokenState,
    build_scorer,
)
from mmssm.testing import tiny_arch

# 16 channels, 4 layers, L1's layout (1 stem conv, DW block after layer 0)
PM_TINY = tiny_arch('plainmamba')
VIM_TINY = tiny_arch('vim')
BACKBONES = ['plainmamba', 'vim']


def perturb(model, scale=0.1, seed=0):
    """Move every parameter and BN statistic off its initial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith('num_batches_tracked'):
                continue
            noise = torch.randn(t.shape, generator=gen, dtype=t.dtype)
            if name.endswith('running_var'):
                t.copy_(1 + scale * noise.abs())
            else:
                t.add_(scale * noise)
    return model


def build(kind, prune_cfg=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault('img_size', 64)
    if kind == 'plainmamba':
        model = PlainMamba(arch=dict(PM_TINY), prune_cfg=prune_cfg, **kwargs)
    else:
        model = Vim(arch=dict(VIM_TINY), prune_cfg=prune_cfg, **kwargs)
    return perturb(model, seed=seed)


def pair(kind, prune_cfg, dtype=torch.float64, **kwargs):
    """A dense and a pruned model with the same weights."""
    dense = build(kind, None, **kwargs).to(dtype).eval()
    pruned = build(kind, prune_cfg, **kwargs).to(dtype).eval()
    pruned.load_state_dict(dense.state_dict())
    return dense, pruned


def run_all(model, x):
    """States after each layer (after the pruning step of that layer)."""
    state = model.init_tokens(x)
    states = []
    for i in range(model.num_layers):
        state = model.run_layers(state, i, i + 1)
        states.append(state)
    return states


# --------------------------------------------------------------------------
# Keeping every token is the dense model
# --------------------------------------------------------------------------
@pytest.mark.parametrize('align', [True, False])
@pytest.mark.parametrize('kind', BACKBONES)
def test_keep_all_equals_dense(kind, align):
    cfg = dict(layers=(1, 2), keep_ratios=1.0, align=align)
    dense, pruned = pair(kind, cfg, out_indices=(0, 1, 2, 3))
    x = torch.randn(2, 3, 48, 80, dtype=torch.float64)
    with torch.no_grad():
        for a, b in zip(dense(x), pruned(x)):
            assert torch.equal(a, b)
        # the general path: every token kept through an explicit index
        state = pruned.init_tokens(x)
        state = pruned.run_layers(state, 0, 1)
        assert state.index is None  # keep 1.0 skips the step
        B, L, _ = state.tokens.shape
        state = dataclasses.replace(
            state,
            index=torch.arange(L).expand(B, L),
            frozen=torch.zeros_like(state.tokens),
        )
        state = pruned.run_layers(state, 1, 4)
        expected = dense.run_layers(dense.init_tokens(x), 0, 4)
        assert torch.equal(state.tokens, expected.tokens)
        assert torch.equal(pruned.output(state, 3), dense.output(expected, 3))


# --------------------------------------------------------------------------
# Shapes, schedule, frozen tokens
# --------------------------------------------------------------------------
@pytest.mark.parametrize('kind', BACKBONES)
def test_output_shapes_stay_full_grid(kind):
    cfg = dict(layers=(1, 3), keep_ratios=(0.5, 0.6))
    model = build(kind, cfg, out_indices=(0, 1, 2, 3)).eval()
    with torch.no_grad():
        for hw, grid in (((64, 64), (4, 4)), ((112, 137), (7, 9))):
            outs = model(torch.randn(2, 3, *hw))
            assert [o.shape for o in outs] == [(2, 16, *grid)] * 4


@pytest.mark.parametrize('kind', BACKBONES)
def test_kept_count_follows_schedule(kind):
    cfg = dict(layers=(1, 2), keep_ratios=(0.5, 0.7))
    model = build(kind, cfg).eval()
    x = torch.randn(2, 3, 128, 128)  # 8 x 8 = 64 patches
    with torch.no_grad():
        states = run_all(model, x)
    extra = 1 if kind == 'vim' else 0  # the class token is not counted
    counts = [s.tokens.shape[1] - extra for s in states]
    # floor(0.5 * 64) = 32, then floor(0.7 * 32) = 22
    assert counts == [32, 22, 22, 22]
    for s in states:
        assert s.frozen.shape[1] == 64 + extra
        assert s.kept_mask().sum(1).tolist() == [s.tokens.shape[1]] * 2
        # kept indices sorted, per image
        assert bool((s.index.diff(dim=1) > 0).all())
    assert not torch.equal(states[0].index[0], states[0].index[1])


def test_num_keep():
    pruner = TokenPruner((1, 2), (0.7, 0.29), num_layers=4)
    assert pruner.num_keep(0, 10) == 7  # 0.7 * 10 is 7.000000000000001
    assert pruner.num_keep(1, 100) == 29  # 0.29 * 100 is 28.999999999999996
    assert pruner.num_keep(1, 7) == 2  # floor
    with pytest.raises(ValueError, match=r'keep_ratios\[1\]'):
        pruner.num_keep(1, 3)


@pytest.mark.parametrize('kind', BACKBONES)
def test_frozen_tokens_keep_their_value_at_pruning(kind):
    cfg = dict(layers=(1, 2), keep_ratios=(0.5, 0.5))
    dense, pruned = pair(kind, cfg, out_indices=(0, 1, 2, 3))
    x = torch.randn(2, 3, 64, 80, dtype=torch.float64)
    with torch.no_grad():
        states = run_all(pruned, x)
        dense_after_0 = dense.run_layers(dense.init_tokens(x), 0, 1).tokens
    first, second = states[0], states[1]
    # step 1 freezes the whole sequence after layer 0 (still dense there)
    assert torch.equal(first.frozen, dense_after_0)
    # step 2 freezes the full sequence after layer 1, i.e. what a model
    # pruning only after layer 0 has after layer 1
    once = build(
        kind, dict(layers=(1,), keep_ratios=0.5), out_indices=(0, 1, 2, 3)
    )
    once = once.double().eval()
    once.load_state_dict(dense.state_dict())
    with torch.no_grad():
        after_1 = run_all(once, x)[1]
    assert torch.equal(second.frozen, after_1.full())
    for s in states[1:]:
        pruned_1 = ~first.kept_mask()  # pruned at step 1
        pruned_2 = first.kept_mask() & ~second.kept_mask()
        full = s.full()
        assert torch.equal(full[pruned_1], dense_after_0[pruned_1])
        assert torch.equal(full[pruned_2], second.frozen[pruned_2])
        assert pruned_2.any() and pruned_1.any()
    # the outputs are the full grid with the frozen tokens
    with torch.no_grad():
        outs = pruned(x)
    last = states[-1]
    expected = pruned.output(last, 3)
    assert torch.equal(outs[-1], expected)
    if kind == 'plainmamba':
        normed = pruned.ln1(last.full())
        grid = normed.transpose(1, 2).reshape(2, 16, *last.hw)
        assert torch.equal(outs[-1], grid)


@pytest.mark.parametrize('kind', BACKBONES)
def test_grouped_run_layers_equal_layer_by_layer(kind):
    """The adapter runs groups of layers and may replace the tokens."""
    cfg = dict(layers=(1, 2), keep_ratios=(0.6, 0.6))
    model = build(kind, cfg).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        by_layer = run_all(model, x)[-1]
        state = model.init_tokens(x)
        for start, end in ((0, 3), (3, 4)):  # a step inside a group
            state = model.run_layers(state, start, end)
        assert torch.equal(state.tokens, by_layer.tokens)
        assert torch.equal(state.index, by_layer.index)
        # an update of the kept tokens between groups is used
        state = model.run_layers(model.init_tokens(x), 0, 3)
        updated = dataclasses.replace(state, tokens=state.tokens + 1)
        a = model.run_layers(updated, 3, 4)
        b = model.run_layers(state, 3, 4)
        assert not torch.allclose(a.tokens, b.tokens)
        assert torch.equal(a.frozen, b.frozen)


@pytest.mark.parametrize('kind', BACKBONES)
def test_aligned_differs_from_naive(kind):
    dense, aligned = pair(kind, dict(layers=(1,), keep_ratios=0.5))
    naive = build(kind, dict(layers=(1,), keep_ratios=0.5, align=False))
    naive = naive.double().eval()
    naive.load_state_dict(dense.state_dict())
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        a, b = run_all(aligned, x)[-1], run_all(naive, x)[-1]
    assert torch.equal(a.index, b.index)  # same selection after layer 1
    assert not torch.allclose(a.tokens, b.tokens)


# --------------------------------------------------------------------------
# Importance
# --------------------------------------------------------------------------
def test_importance_scorers():
    y = torch.tensor(
        [
            [
                [3.0, -3.0, 0.0],  # clip 3, l1 6, l2 4.24, raw 0
                [2.0, 0.0, 0.0],  # clip 2, l1 2, l2 2, raw 2
                [-1.0, -1.0, -1.0],  # clip 0, l1 3, l2 1.73, raw -3
                [1.0, 1.0, 1.5],  # clip 3.5, l1 3.5, l2 2.06, raw 3.5
            ]
        ],
        requires_grad=True,
    )
    expected = {
        'clip': [3.0, 2.0, 0.0, 3.5],
        'l1': [6.0, 2.0, 3.0, 3.5],
        'l2': [18**0.5, 2.0, 3**0.5, 4.25**0.5],
        'raw': [0.0, 2.0, -3.0, 3.5],
    }
    top2 = {
        'clip': [0, 3],
        'l1': [0, 3],
        'l2': [0, 3],
        'raw': [1, 3],
    }
    top1 = {'clip': [3], 'l1': [0], 'l2': [0], 'raw': [3]}
    state = TokenState(torch.randn(1, 4, 2), (2, 2))
    for metric, values in expected.items():
        scores = build_scorer(metric)(state, y, 0)
        assert not scores.requires_grad
        torch.testing.assert_close(scores, torch.tensor([values]))
        for keep, top in ((0.5, top2), (0.25, top1)):
            pruner = TokenPruner((1,), keep, num_layers=2, scorer=metric)
            pruned = pruner.prune(state, y, 0)
            assert pruned.index.tolist() == [top[metric]], metric
    with pytest.raises(ValueError, match='scorer'):
        build_scorer('max')


@pytest.mark.parametrize('kind', BACKBONES)
def test_backbone_keeps_its_top_scored_tokens(kind):
    """End to end: the tokens kept after a layer are the top-k by the clip
    score of that layer's SSM output, per image. Vim keeps its middle class
    token and, to keep it in the middle, half of the others on each side of
    it: the top k // 2 before it and the top k - k // 2 after it."""
    model = build(kind, dict(layers=(2,), keep_ratios=0.5)).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        state = model.run_layers(model.init_tokens(x), 0, 1)
        _, ssm_out = model.run_layer(1, state)
        index = model.run_layers(state, 1, 2).index
    scores = ssm_out.clamp(min=0).sum(-1)  # (B, L): the paper's score

    def top(scores, k, offset=0):
        return scores.topk(k, dim=1).indices.sort(dim=1).values + offset

    if kind == 'plainmamba':
        assert torch.equal(index, top(scores, index.shape[1]))
    else:
        c = state.cls_index
        k = index.shape[1] - 1  # patch tokens kept
        cls = torch.full((2, 1), c)
        expected = torch.cat(
            [
                top(scores[:, :c], k // 2),
                cls,
                top(scores[:, c + 1 :], k - k // 2, c + 1),
            ],
            dim=1,
        )
        assert torch.equal(index, expected)


# --------------------------------------------------------------------------
# Extension points: step hooks, the reference scorers, state helpers
# --------------------------------------------------------------------------
@pytest.mark.parametrize('kind', BACKBONES)
def test_step_hooks_see_every_step(kind):
    model = build(kind, dict(layers=(1, 2), keep_ratios=0.5)).eval()
    seen = []

    def hook(pruner, step, before, after, scores):
        assert pruner is model.pruner
        assert scores.shape == before.tokens.shape[:2]
        seen.append((step, after.patch_kept_mask().clone()))

    handle = model.pruner.register_step_hook(hook)
    x = torch.randn(2, 3, 64, 80)  # 4 x 5 patches
    with torch.no_grad():
        states = run_all(model, x)
    assert [step for step, _ in seen] == [0, 1]
    for (_, mask), state in zip(seen, states):
        assert mask.shape == (2, 4, 5)
        extra = 1 if kind == 'vim' else 0  # the class token is left out
        assert mask.sum((1, 2)).tolist() == [state.tokens.shape[1] - extra] * 2
    assert torch.equal(seen[-1][1], states[-1].patch_kept_mask())
    assert states[-1].patch_stride == 16
    handle.remove()
    with torch.no_grad():
        model(x)
    assert len(seen) == 2


@pytest.mark.parametrize('kind', BACKBONES)
def test_given_scorer_keeps_the_given_tokens(kind):
    """The reference selection of the fidelity study: the pruner keeps the
    tokens with the highest given scores of the full sequence."""
    cfg = dict(layers=(1,), keep_ratios=0.25, scorer='given')
    model = build(kind, cfg).eval()
    x = torch.randn(1, 3, 64, 64)  # 16 patches
    L = 16 + (1 if kind == 'vim' else 0)
    scores = torch.zeros(1, L)
    wanted = [0, 5, 10, 15] if kind == 'plainmamba' else [0, 5, 11, 16]
    scores[0, wanted] = 1.0
    with pytest.raises(ValueError, match='given'):
        with torch.no_grad():
            model(x)
    model.pruner.scorer.scores = scores
    with torch.no_grad():
        state = model.run_layers(model.init_tokens(x), 0, 2)
    expected = wanted if kind == 'plainmamba' else [0, 5, 8, 11, 16]
    assert state.index.tolist() == [expected]


def test_random_scorer_is_reproducible():
    cfg = dict(layers=(1,), keep_ratios=0.5, scorer=dict(type='random'))
    model = build('plainmamba', cfg).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        first = model.run_layers(model.init_tokens(x), 0, 2).index
        model.pruner.scorer.reset()
        again = model.run_layers(model.init_tokens(x), 0, 2).index
    assert torch.equal(first, again)


def test_bad_prune_cfg_is_a_user_error():
    from mmssm.errors import UserError

    with pytest.raises(UserError, match='keep_ratios'):
        build('vim', dict(layers=(1,), keep_ratios=2.0))


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    'kind,align,with_cp',
    [
        ('plainmamba', True, False),
        ('plainmamba', False, True),
        ('vim', True, True),
        ('vim', False, False),
    ],
)
def test_grads_reach_every_parameter(kind, align, with_cp):
    cfg = dict(layers=(1, 2), keep_ratios=0.6, align=align)
    model = build(kind, cfg, out_indices=(1, 3), with_cp=with_cp)
    model.train()
    outs = model(torch.randn(2, 3, 64, 48))
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------
# Vim's class token
# --------------------------------------------------------------------------
@pytest.mark.parametrize('hw', [(64, 64), (48, 80)])  # M = 16, 15
def test_vim_class_token_stays_in_the_middle(hw):
    cfg = dict(layers=(1, 2, 3), keep_ratios=(0.7, 0.6, 0.5))
    model = build('vim', cfg, out_type='cls_token').eval()
    x = torch.randn(3, 3, *hw)
    with torch.no_grad():
        states = run_all(model, x)
        out = model(x)[0]
    M = hw[0] // 16 * hw[1] // 16
    for s in states:
        K = s.tokens.shape[1]
        assert s.cls_index == M // 2
        # the middle of the kept sequence, as M // 2 of M patch tokens
        assert s.index[:, (K - 1) // 2].tolist() == [M // 2] * 3
        assert s.kept_mask()[:, M // 2].all()
    # the class token output is the computed (never frozen) one
    last = states[-1]
    K = last.tokens.shape[1]
    torch.testing.assert_close(out, model.norm_f(last.tokens)[:, (K - 1) // 2])


def test_vim_positions_reach_the_layers():
    """Pruned layers scan at the kept tokens' original positions."""
    cfg = dict(layers=(1,), keep_ratios=0.5)
    model = build('vim', cfg).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        state = model.run_layers(model.init_tokens(x), 0, 1)
        out = model.run_layers(state, 1, 2).tokens
        expected, _ = model.layers[1](
            state.tokens, positions=state.index, seq_len=17
        )
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------
def test_paper_schedules():
    expected = {
        (PlainMamba, 'l1'): ((5, 10), 0.8),
        (PlainMamba, 'l2'): ((5, 10, 15), 0.81),
        (PlainMamba, 'l3'): ((5, 11, 17, 23), 0.73),
        (Vim, 't'): ((10, 20), 0.83),
        (Vim, 's'): ((5, 10, 15, 20), 0.81),
    }
    for (cls, arch), (layers, ratio) in expected.items():
        assert PAPER_SCHEDULES[cls.family][arch] == dict(
            layers=layers, keep_ratios=ratio
        )
        pruner = cls(arch, prune_cfg='paper').pruner
        assert pruner.layers == layers
        assert pruner.keep_ratios == (ratio,) * len(layers)
        assert (pruner.scorer_cfg, pruner.align, pruner.gap_mode) == (
            'clip',
            True,
            'prev',
        )
        naive = cls(arch, prune_cfg=dict(schedule='paper', align=False))
        assert naive.pruner.layers == layers
        assert not naive.pruner.align
        assert naive.pruner.scan_gap_mode == 'none'
        assert cls(arch).pruner is None
    # the registered type, named in the config
    typed = Vim(
        't', prune_cfg=dict(type='mmssm.TokenPruner', schedule='paper')
    )
    assert typed.pruner.layers == (10, 20)
    with pytest.raises(ValueError, match='paper'):
        Vim('b', prune_cfg='paper')  # the paper prunes no Vim-B
    with pytest.raises(ValueError, match='paper'):
        Vim(dict(VIM_TINY), prune_cfg='paper')  # nor an arch dict


@pytest.mark.parametrize(
    'cfg,match',
    [
        (dict(layers=(2, 1), keep_ratios=0.5), 'increasing'),
        (dict(layers=(1, 1), keep_ratios=0.5), 'increasing'),
        (dict(layers=(1, 4), keep_ratios=0.5), 'out of range'),
        (dict(layers=(-1,), keep_ratios=0.5), 'depthwise'),
        (dict(layers=(1.5,), keep_ratios=0.5), 'layers'),
        (dict(layers=5, keep_ratios=0.5), 'layers'),
        (dict(layers=(1, 2), keep_ratios=(0.5,)), 'keep_ratios'),
        (dict(layers=(1,), keep_ratios=0.0), 'keep_ratios'),
        (dict(layers=(1,), keep_ratios=1.5), 'keep_ratios'),
        (dict(layers=(1,), keep_ratios=(-0.5,)), 'keep_ratios'),
        (dict(layers=(1,), keep_ratios='half'), 'keep_ratios'),
        (dict(layers=(1,), keep_ratios=0.5, scorer='max'), 'scorer'),
        (dict(layers=(1,), keep_ratios=0.5, gap_mode='zero'), 'gap_mode'),
        (dict(layers=(1,), keep_ratios=0.5, gap_mode='none'), 'align'),
        (dict(layers=(1,), keep_ratios=0.5, metric='clip'), 'metric'),
        (dict(layers=(1,), keep_ratios=0.5, align='yes'), 'align'),
        (dict(layers=(1,), keep_ratios=0.5, ratio=0.5), 'ratio'),
        (dict(keep_ratios=0.5), 'layers'),
        (dict(schedule='paper'), 'paper'),
        (dict(schedule='paper', layers=(1,)), 'layers'),
        ('dense', 'prune_cfg'),
    ],
)
@pytest.mark.parametrize('kind', BACKBONES)
def test_bad_schedules(kind, cfg, match):
    if match == 'depthwise' and kind == 'vim':
        match = 'out of range'
    with pytest.raises(ValueError, match=match):
        build(kind, cfg)


def test_prune_before_depthwise_block():
    with pytest.raises(ValueError, match='depthwise block of layer index 0'):
        PlainMamba('l1', prune_cfg=dict(layers=(0, 5), keep_ratios=0.5))
    arch = dict(PM_TINY, dw_layers=[1])
    with pytest.raises(ValueError, match='depthwise block'):
        PlainMamba(arch, prune_cfg=dict(layers=(1,), keep_ratios=0.5))
    PlainMamba(arch, prune_cfg=dict(layers=(2,), keep_ratios=0.5))


@pytest.mark.parametrize('kind', BACKBONES)
def test_ratio_keeping_no_token_at_input_size(kind):
    model = build(kind, dict(layers=(1,), keep_ratios=0.1)).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))  # 16 patches: keeps 1
        with pytest.raises(ValueError, match='keep_ratios'):
            model(torch.randn(1, 3, 32, 64))  # 8 patches: keeps 0


def test_paper_flops_match_table_1():
    """The calibrated keep ratios give the paper's Table 1 FLOPs (L1,
    Vim-T; the other arches are checked the same way, too slow here)."""
    from mmssm.models.classifiers import build_classifier
    from mmssm.utils.flops import count_flops

    x = torch.randn(1, 3, 224, 224)
    for backbone, target in (
        (dict(type='mmssm.PlainMamba', arch='l1'), 2.46),
        (dict(type='mmssm.Vim', arch='t'), 1.29),
    ):
        model = build_classifier(dict(backbone, prune_cfg='paper'))
        flops = count_flops(model, x).total / 1e9
        assert abs(flops / target - 1) < 0.02, (backbone, flops)
