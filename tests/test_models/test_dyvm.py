"""DyVM's learned token pruning (``mmssm.LearnedTokenPruner``): the
predictor, the schedule, the vectorised partition and training that equals
inference, on both backbones and in both modes."""

import dataclasses

import pytest
import torch

from mmssm.errors import UserError
from mmssm.models.backbones import PlainMamba, Vim
from mmssm.models.pruning import (
    DYVM_SCHEDULES,
    LearnedTokenPruner,
    PredictorScore,
    TokenPredictor,
    TokenState,
)
from mmssm.testing import tiny_arch

BACKBONES = ['plainmamba', 'vim']


def learned_cfg(**kwargs):
    return dict(
        dict(type='mmssm.LearnedTokenPruner', layers=(1, 2), keep_ratios=0.7),
        **kwargs,
    )


def build(kind, prune_cfg, dtype=torch.float64, seed=0, **kwargs):
    """A tiny backbone with every parameter moved off its init (so that
    masked and deleted tokens would differ if they leaked)."""
    torch.manual_seed(seed)
    kwargs.setdefault('img_size', 64)
    if kind == 'plainmamba':
        # BN in eval mode in training too: train and eval forwards compare
        kwargs.setdefault('norm_eval', True)
        model = PlainMamba(
            arch=tiny_arch('plainmamba'), prune_cfg=prune_cfg, **kwargs
        )
    else:
        model = Vim(arch=tiny_arch('vim'), prune_cfg=prune_cfg, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith('num_batches_tracked'):
                continue
            noise = torch.randn(t.shape, generator=gen, dtype=t.dtype)
            if name.endswith('running_var'):
                t.copy_(1 + 0.1 * noise.abs())
            else:
                t.add_(0.1 * noise)
    return model.to(dtype)


def slow_partition(kept, is_patch):
    """The released per-image loop: kept patch tokens, then pruned ones,
    each in order; the class token inserted at k // 2 of the kept."""
    perms = []
    for kb, pb in zip(kept.tolist(), is_patch.tolist()):
        slots = range(len(kb))
        keep = [j for j in slots if kb[j] and pb[j]]
        drop = [j for j in slots if not kb[j]]
        cls = [j for j in slots if not pb[j]]
        c = len(keep) // 2
        perms.append(keep[:c] + cls + keep[c:] + drop)
    return torch.tensor(perms)


def positions(state):
    """(B, K): the tokens' positions in the full sequence."""
    if state.index is not None:
        return state.index
    B, K = state.tokens.shape[:2]
    return torch.arange(K).expand(B, K)


# --------------------------------------------------------------------------
# The predictor and its schedule
# --------------------------------------------------------------------------
def test_predictor_layout_and_global_pool():
    torch.manual_seed(0)
    pred = TokenPredictor(16).double()
    names = [n for n, _ in pred.named_parameters()]
    # the released PredictorLG's keys, so its weights load by name
    assert names[:2] == ['in_conv.0.weight', 'in_conv.0.bias']
    assert names[-2:] == ['out_conv.4.weight', 'out_conv.4.bias']
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    policy = torch.ones(2, 9, dtype=torch.float64)
    policy[:, 4] = 0  # the class token
    policy[:, 7] = 0  # a pruned token
    out = pred(x, policy)
    assert out.shape == (2, 9, 2)
    assert torch.allclose(out.exp().sum(-1), torch.ones(2, 9).double())
    # tokens out of the policy do not move the others' decisions ...
    y = x.clone()
    y[:, [4, 7]] += 5.0
    same = [j for j in range(9) if j not in (4, 7)]
    assert torch.equal(pred(y, policy)[:, same], out[:, same])
    # ... the kept ones do, through the global half
    y = x.clone()
    y[:, 0] += torch.randn(16, dtype=torch.float64)
    assert not torch.equal(pred(y, policy)[:, 1], out[:, 1])


def test_dyvm_schedules():
    assert DYVM_SCHEDULES['vim']['s'] == dict(
        layers=(6, 12, 18), keep_ratios=0.7
    )
    assert DYVM_SCHEDULES['vim']['t']['keep_ratios'] == 0.9
    m = Vim(arch='small', prune_cfg='dyvm', img_size=32)
    assert isinstance(m.pruner, LearnedTokenPruner)
    assert m.pruner.layers == (6, 12, 18)
    assert m.pruner.keep_ratios == (0.7, 0.49, 0.343)
    # DyVM-Vim-S at 224: 196 patches keep int(r^s * 196)
    assert [m.pruner.num_keep(s, 196) for s in range(3)] == [137, 96, 67]
    expected = {'l1': (3, 6, 9), 'l2': (6, 12, 18), 'l3': (9, 18, 27)}
    for arch, layers in expected.items():
        assert DYVM_SCHEDULES['plainmamba'][arch]['layers'] == layers


@pytest.mark.parametrize(
    'cfg, match',
    [
        (dict(gap_mode='prev'), "must be 'null'"),
        (dict(keep_ratios=[0.5, 0.7]), 'cannot increase'),
        (dict(tau=0), 'tau'),
        (dict(schedule='dyvm', layers=(1,)), 'do not give'),
    ],
)
def test_bad_learned_cfg(cfg, match):
    with pytest.raises(UserError, match=match):
        Vim(arch=tiny_arch('vim'), img_size=64, prune_cfg=learned_cfg(**cfg))


# --------------------------------------------------------------------------
# The partition (vectorised, no loop per image) and inference
# --------------------------------------------------------------------------
@pytest.mark.parametrize('with_cls', [True, False])
def test_partition_equals_per_image_loop(with_cls):
    gen = torch.Generator().manual_seed(0)
    B, K = 16, 17
    kept = torch.rand(B, K, generator=gen) < 0.5
    is_patch = torch.ones(B, K, dtype=torch.bool)
    if with_cls:
        is_patch[:, 8] = False
        kept[:, 8] = True
    kept[0] = False  # an image that keeps no patch token
    kept[0, 8] = with_cls
    kept[1] = True  # one that keeps all
    perm = LearnedTokenPruner.partition(kept, is_patch)
    assert torch.equal(perm, slow_partition(kept, is_patch))


@pytest.mark.parametrize('align', [False, True])
@pytest.mark.parametrize('kind', BACKBONES)
def test_inference_keeps_top_predicted(kind, align):
    model = build(kind, learned_cfg(align=align)).eval()
    seen = []

    def hook(pruner, step, before, after, scores):
        seen.append((step, before, after, scores))

    model.pruner.register_step_hook(hook)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        outs = model(x)
    assert outs[-1].shape == (2, 16, 4, 4)
    M = 16
    for step, before, after, scores in seen:
        k = int([0.7, 0.49][step] * M)
        has_cls = kind == 'vim'
        assert after.tokens.shape[1] == k + has_cls
        # the predictor's keep log-probabilities are the scores
        expected = model.pruner.scorer.log_probs(before, step)[..., 0]
        assert torch.equal(scores, expected)
        cls = before.cls_slots()
        if has_cls:
            scores = scores.scatter(1, cls[:, None], -float('inf'))
        top = scores.topk(k, dim=1).indices
        kept_pos = positions(before).gather(1, top).sort(1).values
        after_pos = after.index
        if has_cls:
            c = after.cls_slots()
            if align:  # in place, sorted
                assert torch.equal(after_pos, after_pos.sort(1).values)
            else:  # re-centred at k // 2
                assert c.tolist() == [k // 2] * 2
            assert (after_pos.gather(1, c[:, None]) == M // 2).all()
            keep = torch.ones_like(after_pos, dtype=torch.bool)
            after_pos = after_pos[keep.scatter(1, c[:, None], False)]
            after_pos = after_pos.view(2, k)
        assert torch.equal(after_pos, kept_pos)


# --------------------------------------------------------------------------
# Training equals inference
# --------------------------------------------------------------------------
@pytest.mark.parametrize('align', [False, True])
@pytest.mark.parametrize('kind', BACKBONES)
def test_training_equals_inference(kind, align):
    """With the same decisions (the 'given' scorer: its inference top-k is
    also the training decision), the masked full-length training forward
    equals the forward with the tokens deleted: every full-grid output,
    the final normed tokens (class token included), the kept sets."""
    cfg = learned_cfg(align=align, scorer='given')
    model = build(kind, cfg, out_indices=(0, 1, 2, 3))
    L = 16 + (kind == 'vim')
    gen = torch.Generator().manual_seed(1)
    model.pruner.scorer.scores = torch.rand(3, L, generator=gen).double()
    x = torch.randn(3, 3, 64, 64, generator=gen, dtype=torch.float64)

    model.train()
    train_outs = model(x)
    train_state = model.final_state
    assert train_state.masked
    decisions = model.aux_outputs['token_decisions']
    assert len(decisions) == 2 and decisions[0].shape == (3, 16)
    train_final = model.final_tokens(train_state)

    model.eval()
    with torch.no_grad():
        eval_outs = model(x)
    eval_state = model.final_state
    assert not eval_state.masked and eval_state.index is not None
    eval_final = model.final_tokens(eval_state)

    assert torch.equal(train_state.kept_mask(), eval_state.kept_mask())
    kept_patches = eval_state.patch_kept_mask().flatten(1).double()
    assert torch.equal(decisions[-1].detach(), kept_patches)
    for a, b in zip(train_outs, eval_outs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    torch.testing.assert_close(train_final, eval_final, rtol=0, atol=1e-10)


@pytest.mark.parametrize('align', [False, True])
@pytest.mark.parametrize('kind', BACKBONES)
def test_gumbel_training_decisions_and_grads(kind, align):
    """Hard Gumbel decisions: exact 0/1, nested over the steps, kept counts
    that vary per image; gradients reach every predictor."""
    model = build(kind, learned_cfg(align=align), dtype=torch.float32)
    model.train()
    torch.manual_seed(3)
    x = torch.randn(8, 3, 64, 64)
    outs = model(x)
    decisions = model.aux_outputs['token_decisions']
    d0, d1 = (d.detach() for d in decisions)
    assert set(d0.unique().tolist()) <= {0.0, 1.0}
    assert (d1 <= d0).all()  # pruned tokens stay pruned
    assert len(set(d0.sum(1).tolist())) > 1  # per-image kept counts
    state = model.final_state
    assert torch.equal(state.patch_kept_mask().flatten(1), d1.bool())
    if kind == 'vim' and not align:
        # kept first, class token at k_b // 2 of the kept patch tokens
        c = state.cls_slots()
        assert torch.equal(c, d1.sum(1).long() // 2)
        kept_slots = state.token_mask.detach().bool()
        k = kept_slots.sum(1)
        assert all(kept_slots[b, : k[b]].all() for b in range(8))
    loss = outs[-1].square().mean() + sum(d.mean() for d in decisions)
    loss.backward()
    for name, p in model.pruner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_masked_state_in_eval_is_an_error():
    model = build('vim', learned_cfg()).train()
    state = model.init_tokens(torch.randn(1, 3, 64, 64).double())
    state = model.run_layers(state, 0, 1)
    assert state.masked
    model.eval()
    with pytest.raises(UserError, match='one mode'):
        model.run_layers(state, 1, 2)


def test_predictor_scorer_policy_excludes_class_and_pruned():
    tokens = torch.randn(2, 5, 8)
    state = TokenState(
        tokens, (2, 2), cls_index=2, token_mask=torch.ones(2, 5)
    )
    state.token_mask[1, 0] = 0
    policy = PredictorScore.policy(state)
    assert policy.tolist() == [[1, 1, 0, 1, 1], [0, 1, 0, 1, 1]]


@pytest.mark.parametrize('kind', BACKBONES)
def test_aux_channel_collects_gates_and_decisions(kind):
    """``aux_outputs``: the direction gates of every layer (in order) and
    the token decisions of every step, fresh at each forward."""
    gated = (Vim if kind == 'vim' else PlainMamba)(
        arch=tiny_arch(kind),
        img_size=64,
        prune_cfg=learned_cfg(),
        direction_gate=True,
    ).train()
    x = torch.randn(2, 3, 64, 64)
    for _ in range(2):
        gated(x)
        aux = gated.aux_outputs
        n_dir = 2 if kind == 'vim' else 4
        assert len(aux['direction_gates']) == 4
        assert all(g.shape == (2, n_dir) for g in aux['direction_gates'])
        assert len(aux['token_decisions']) == 2


def test_aux_channel_of_a_grouped_run():
    """A driver that runs the layers group by group (the adapter) gets the
    same aux channel and final state as ``forward``."""
    model = Vim(arch=tiny_arch('vim'), img_size=64, direction_gate=True)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        state = model.init_tokens(x)
        state = model.run_layers(state, 0, 2)
        state = model.run_layers(state, 2, 4)
    assert model.final_state is state
    assert model.aux_outputs is state.aux
    assert len(model.aux_outputs['direction_gates']) == 4


@pytest.mark.parametrize('align', [False, True])
@pytest.mark.parametrize('kind', BACKBONES)
def test_a_driver_between_runs_cannot_move_masked_tokens(kind, align):
    """As the adapter's injector updates only the kept tokens of a pruned
    state, a change between runs of the layers reaches only the kept
    tokens of a masked one: training still equals inference."""
    cfg = learned_cfg(align=align, scorer='given', layers=(1,))
    model = (
        build(kind, cfg, cls_token=None) if kind == 'vim' else build(kind, cfg)
    )
    gen = torch.Generator().manual_seed(2)
    model.pruner.scorer.scores = torch.rand(2, 16, generator=gen).double()
    x = torch.randn(2, 3, 64, 64, generator=gen, dtype=torch.float64)
    bump = torch.randn(2, 16, 16, generator=gen, dtype=torch.float64)

    def drive(model):
        state = model.init_tokens(x)
        state = model.run_layers(state, 0, 2)
        # a driver's change, given per position of the full sequence
        index = state.index
        if index is None:
            index = torch.arange(16).expand(2, 16)
        change = bump.gather(1, index[..., None].expand(-1, -1, 16))
        state = dataclasses.replace(state, tokens=state.tokens + change)
        return model.run_layers(state, 2, 4).full()

    model.train()
    trained = drive(model)
    model.eval()
    with torch.no_grad():
        inferred = drive(model)
    torch.testing.assert_close(trained, inferred, rtol=0, atol=1e-10)
