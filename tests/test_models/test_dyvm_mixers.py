"""The mixers' side of DyVM: the masked mode and the direction gates.

Rules checked: a masked full-length forward equals the pruned forward on
the kept tokens (aligned: tokens in place, same ``gap_mode``; Vim's
rearranged mode: kept tokens first, the class token at ``k // 2``, the
compact forward of the kept tokens), in float64 to 1e-10; a direction gate
that is all on changes nothing; at inference a direction whose bit is off is
skipped per image and gives what the training-mode multiply by the same
bits gives; the decisions go to ``aux['direction_gates']``.
"""

import pytest
import torch

from mmssm.models.backbones import PlainMamba, Vim
from mmssm.models.backbones.plainmamba import PlainMambaLayer, PlainMambaMixer
from mmssm.models.backbones.vim import BiMambaV2, VimBlock
from mmssm.models.layers import DirectionGate, add_gated
from mmssm.models.layers.direction_gate import select_rows
from mmssm.testing import needs_ext, random_positions, tiny_arch

TOL = dict(rtol=1e-10, atol=1e-10)
F64 = torch.float64


def randomise(module, seed=0, scale=0.3):
    """Move every parameter off its (often symmetric) initial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def vim_mixer(impl='ref', **kwargs):
    return randomise(BiMambaV2(16, d_state=4, scan_impl=impl, **kwargs)).to(
        F64
    )


def pm_mixer(impl='ref', **kwargs):
    mixer = PlainMambaMixer(
        8, d_state=4, conv_size=3, scan_impl=impl, **kwargs
    )
    return randomise(mixer).to(F64)


def mask_of(positions, L):
    return torch.zeros(positions.shape[0], L, dtype=F64).scatter(
        1, positions, 1.0
    )


def at(t, positions):
    """(B, L, C) read at (B, K) positions."""
    return t.gather(1, positions[..., None].expand(-1, -1, t.shape[-1]))


def vim_kept_positions(batch, k, L, cls):
    """Sorted kept positions with the class token ``cls`` always kept."""
    rest = [i for i in range(L) if i != cls]
    pos = random_positions(batch, k, L - 1)
    pos = torch.tensor(rest)[pos]
    return torch.cat([pos, torch.full((batch, 1), cls)], 1).sort(-1).values


# --------------------------------------------------------------------------
# Masked mode.
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    'impl', ['ref', pytest.param('auto', marks=needs_ext)]
)
@pytest.mark.parametrize('gap_mode', ['null', 'prev'])
def test_vim_masked_in_place_equals_aligned(gap_mode, impl):
    torch.manual_seed(0)
    mixer = vim_mixer(impl)
    L, cls = 13, 6
    x = torch.randn(3, L, 16, dtype=F64)
    pos = vim_kept_positions(3, 7, L, cls)
    masked, y_m = mixer(x, token_mask=mask_of(pos, L), gap_mode=gap_mode)
    pruned, y_p = mixer(at(x, pos), pos, L, gap_mode=gap_mode)
    torch.testing.assert_close(at(masked, pos), pruned, **TOL)
    torch.testing.assert_close(at(y_m, pos), y_p, **TOL)
    if gap_mode == 'null':  # the contract's default for a mask
        default, _ = mixer(x, token_mask=mask_of(pos, L))
        assert torch.equal(default, masked)


def rearrange(x, pos, cls):
    """DyVM's partition of one sample: kept patch tokens in order with the
    class token at k // 2, then the pruned tokens; also the mask."""
    L = x.shape[0]
    patches = [int(i) for i in pos if i != cls]
    pruned = [i for i in range(L) if i not in pos.tolist()]
    k = len(patches)
    order = patches[: k // 2] + [cls] + patches[k // 2 :] + pruned
    mask = torch.zeros(L, dtype=F64)
    mask[: k + 1] = 1
    return x[order], mask, k + 1


@pytest.mark.parametrize('gap_mode', ['null', 'none'])
def test_vim_masked_rearranged_equals_compact(gap_mode):
    torch.manual_seed(1)
    mixer = vim_mixer()
    L, cls = 13, 6
    x = torch.randn(3, L, 16, dtype=F64)
    xs, masks, lengths = [], [], []
    for b, k in enumerate((4, 8, 12)):  # each sample keeps its own count
        pos = vim_kept_positions(1, k, L, cls)[0]
        xb, mb, n = rearrange(x[b], pos, cls)
        xs.append(xb), masks.append(mb), lengths.append(n)
    x, mask = torch.stack(xs), torch.stack(masks)
    out, y = mixer(x, token_mask=mask, gap_mode=gap_mode)
    for b, n in enumerate(lengths):
        compact, y_c = mixer(x[b : b + 1, :n])
        torch.testing.assert_close(out[b : b + 1, :n], compact, **TOL)
        torch.testing.assert_close(y[b : b + 1, :n], y_c, **TOL)


@pytest.mark.parametrize(
    'impl', ['ref', pytest.param('auto', marks=needs_ext)]
)
@pytest.mark.parametrize('gap_mode', ['null', 'prev', 'none'])
def test_plainmamba_masked_equals_pruned(gap_mode, impl):
    torch.manual_seed(2)
    mixer = pm_mixer(impl)
    hw, L = (4, 5), 20
    x = torch.randn(2, L, 8, dtype=F64)
    pos = random_positions(2, 9, L)
    masked, y_m = mixer(x, hw, token_mask=mask_of(pos, L), gap_mode=gap_mode)
    pruned, y_p = mixer(at(x, pos), hw, pos, gap_mode=gap_mode)
    torch.testing.assert_close(at(masked, pos), pruned, **TOL)
    torch.testing.assert_close(at(y_m, pos), y_p, **TOL)
    # the masked tokens give no SSM output
    assert torch.equal(y_m * (1 - mask_of(pos, L))[..., None], 0 * y_m)


def test_masked_mode_errors():
    x = torch.randn(1, 6, 8, dtype=F64)
    pos = torch.tensor([[0, 2, 3]])
    with pytest.raises(ValueError, match='exclusive'):
        pm_mixer()(x[:, :3], (2, 3), pos, token_mask=torch.ones(1, 6))
    with pytest.raises(ValueError, match='token_mask must be'):
        pm_mixer()(x, (2, 3), token_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match='exclusive'):
        vim_mixer()(
            torch.randn(1, 3, 16, dtype=F64), pos, token_mask=torch.ones(1, 3)
        )


def test_mask_gradients_reach_every_parameter():
    torch.manual_seed(3)
    for mixer, args, L in (
        (vim_mixer(direction_gate=True), (), 9),
        (pm_mixer(direction_gate=True), ((3, 3),), 9),
    ):
        mixer.train()
        x = torch.randn(2, L, mixer.embed_dims, dtype=F64)
        mask = mask_of(random_positions(2, 5, L), L).requires_grad_()
        out, _ = mixer(x, *args, token_mask=mask)
        out.square().sum().backward()
        for name, p in mixer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert mask.grad is not None  # straight-through decisions train


# --------------------------------------------------------------------------
# Direction gates.
# --------------------------------------------------------------------------
def test_gate_head():
    gate = DirectionGate(6, 4)
    assert torch.equal(gate.fc.weight, torch.zeros(4, 6))
    assert torch.equal(gate.fc.bias, torch.full((4,), 5.0))
    xz = torch.randn(3, 5, 6)
    mask = torch.tensor([[1, 1, 0, 0, 1.0]] * 3)
    assert torch.equal(gate.pool(xz, 2), xz[:, 2])
    per_sample = gate.pool(xz, torch.tensor([0, 4, 1]))
    assert torch.equal(per_sample, xz[[0, 1, 2], [0, 4, 1]])
    torch.testing.assert_close(
        gate.pool(xz, None, mask), xz[:, [0, 1, 4]].mean(1)
    )
    # eval: logit > threshold; training: P(on) = sigmoid(logit)
    with torch.no_grad():
        gate.fc.bias.copy_(torch.tensor([-1.0, 0.0, 1.0, 2.0]))
    gate.eval()
    assert gate(xz).tolist() == [[0, 0, 1, 1]] * 3
    gate.threshold_logit = 1.5
    assert gate(xz).tolist() == [[0, 0, 0, 1]] * 3
    gate.train()
    torch.manual_seed(0)
    bits = gate(torch.randn(20000, 1, 6))
    assert set(bits.unique().tolist()) == {0.0, 1.0}
    expected = torch.sigmoid(gate.fc.bias.detach())
    torch.testing.assert_close(bits.mean(0), expected, rtol=0, atol=0.02)


@pytest.mark.parametrize('family', ['vim', 'plainmamba'])
def test_gate_all_on_changes_nothing(family):
    torch.manual_seed(4)
    make = vim_mixer if family == 'vim' else pm_mixer
    plain = make()
    gated = make(direction_gate=dict(init_bias=50.0))
    gated.load_state_dict(plain.state_dict(), strict=False)
    args = () if family == 'vim' else ((3, 4),)
    x = torch.randn(2, 12, plain.embed_dims, dtype=F64)
    aux = {}
    for mode in (True, False):  # training (noise cannot flip) and eval
        gated.train(mode)
        out, y = gated(x, *args, aux=aux)
        torch.testing.assert_close(out, plain(x, *args)[0], **TOL)
    n_dir = 2 if family == 'vim' else 4
    assert [tuple(b.shape) for b in aux['direction_gates']] == [(2, n_dir)] * 2
    assert all(bool((b == 1).all()) for b in aux['direction_gates'])


def decisive_gate(mixer, seed):
    """Gate weights so large that the training noise cannot flip a bit
    (|logit| >> 1) and the bits differ between images."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = mixer.direction_gate.fc.weight
        w.copy_(1e4 * torch.randn(w.shape, generator=gen, dtype=w.dtype))
        mixer.direction_gate.fc.bias.zero_()


@pytest.mark.parametrize('family', ['vim', 'plainmamba'])
@pytest.mark.parametrize('mode', ['dense', 'masked', 'pruned'])
def test_gate_skip_equals_multiply(family, mode):
    """Inference runs a direction on the images whose bit is on only; the
    result equals the training-mode product with the same bits (dense,
    masked and pruned sequences)."""
    torch.manual_seed(5)
    make = vim_mixer if family == 'vim' else pm_mixer
    mixer = make(direction_gate=True)
    decisive_gate(mixer, seed=0)
    batch, L = 6, 12
    args = () if family == 'vim' else ((3, 4),)
    x = torch.randn(batch, L, mixer.embed_dims, dtype=F64)
    kwargs = {}
    if mode != 'dense':
        pos = random_positions(batch, 7, L)
    if mode == 'masked':
        kwargs['token_mask'] = mask_of(pos, L)
    if mode == 'pruned':
        x = at(x, pos)
        args = (pos, L) if family == 'vim' else ((3, 4), pos)
    elif family == 'vim':
        kwargs['cls_index'] = 5
    mixer.eval()
    aux = {}
    skipped, y_s = mixer(x, *args, aux=aux, **kwargs)
    bits = aux['direction_gates'][0]
    # some images run a direction and some do not (the subset path)
    assert 0 < bits.sum() < bits.numel()
    assert bool(((bits.sum(0) > 0) & (bits.sum(0) < batch)).any())
    mixer.direction_gate.train()
    aux = {}
    multiplied, y_m = mixer(x, *args, aux=aux, **kwargs)
    assert torch.equal(aux['direction_gates'][0], bits)
    torch.testing.assert_close(skipped, multiplied, **TOL)
    torch.testing.assert_close(y_s, y_m, **TOL)
    # and each image alone gives its own row
    mixer.eval()
    for b in range(batch):
        one = {
            k: v[b : b + 1] if k == 'token_mask' else v
            for k, v in kwargs.items()
        }
        one_args = [
            a[b : b + 1] if isinstance(a, torch.Tensor) else a for a in args
        ]
        out, _ = mixer(x[b : b + 1], *one_args, **one)
        torch.testing.assert_close(out, skipped[b : b + 1], **TOL)


def test_gate_off_runs_nothing(monkeypatch):
    """All bits off: no scan runs at all, the output is out_proj(0)."""
    mixer = vim_mixer(direction_gate=dict(init_bias=-5.0)).eval()
    calls = []
    monkeypatch.setattr(mixer, '_branch', lambda *a: calls.append(a))
    out, y = mixer(torch.randn(2, 7, 16, dtype=F64), cls_index=3)
    assert not calls and torch.equal(y, torch.zeros_like(y))
    torch.testing.assert_close(out, mixer.out_proj(y / 2), rtol=0, atol=0)


def test_add_gated():
    """No bits: the sum; training: times the bits; inference: the selected
    rows only, added in place, zeros before the first direction."""
    rows = torch.arange(5.0)[:, None, None].expand(5, 3, 2)  # (R, C, K)
    calls = []

    def run(index):
        calls.append(index)
        return rows.clone() if index is None else rows[index] * 10

    sel = torch.tensor([1, 0, 1, 0, 0.0])
    assert torch.equal(add_gated(None, run, None, False, rows), rows)
    assert torch.equal(add_gated(rows, run, None, False, rows), 2 * rows)
    trained = add_gated(rows, run, sel, True, rows)
    assert trained[:, 0, 0].tolist() == [0, 1, 4, 3, 4]
    out = add_gated(None, run, sel, False, rows)
    assert out[:, 0, 0].tolist() == [0, 0, 20, 0, 0]
    total = torch.ones(5, 3, 2)
    with torch.no_grad():  # in place where autograd does not record
        assert add_gated(total, run, sel, False, rows) is total
    assert total[:, 0, 0].tolist() == [1, 1, 21, 1, 1]
    calls.clear()
    assert not add_gated(None, run, torch.zeros(5), False, rows).any()
    assert add_gated(total, run, torch.zeros(5), False, rows) is total
    assert not calls  # nothing selected: nothing runs
    assert torch.equal(add_gated(None, run, torch.ones(5), False, rows), rows)
    assert calls == [None]  # all selected: the whole batch, no gathers


def test_selected_rows_keep_the_kernels_layout():
    """At inference a direction's inputs are selected in their tokens-major
    layout (a (B, E, K) view of a projection's (B, K, 2E) output), which
    the kernels read without a copy, and the gated sum keeps it."""
    xz = torch.randn(4, 7, 10)
    u = xz[..., :5].transpose(1, 2)  # (B, E, K) view
    index = torch.tensor([0, 2])
    rows = select_rows(u, index)
    assert torch.equal(rows, u[index]) and rows.stride(1) == 1
    assert select_rows(None, index) is None
    mask = torch.rand(4, 7)
    assert torch.equal(select_rows(mask, index), mask[index])

    def run(index):
        return u if index is None else 2 * select_rows(u, index)

    out = add_gated(None, run, torch.tensor([1, 0, 1, 0]), False, u)
    assert out.stride(1) == 1
    assert torch.equal(out[index], 2 * u[index])
    assert not out[[1, 3]].any()
    out = add_gated(out, run, torch.tensor([0, 1, 1, 0]), False, u)
    assert out.stride(1) == 1
    assert torch.equal(out, u * torch.tensor([2.0, 2, 4, 0])[:, None, None])


@pytest.mark.parametrize('gap_mode', ['null', 'prev'])
def test_gated_masked_equals_gated_pruned(gap_mode):
    """With gates, the masked forward (gate on the mask-weighted mean, or
    the class token) equals the pruned one (the mean over the kept tokens,
    the class token's slot among them)."""
    torch.manual_seed(6)
    mixer = pm_mixer(direction_gate=True).eval()
    decisive_gate(mixer, seed=1)
    hw, L = (4, 5), 20
    x = torch.randn(4, L, 8, dtype=F64)
    pos = random_positions(4, 9, L)
    aux = {}
    masked, _ = mixer(
        x, hw, token_mask=mask_of(pos, L), gap_mode=gap_mode, aux=aux
    )
    pruned, _ = mixer(at(x, pos), hw, pos, gap_mode=gap_mode, aux=aux)
    assert torch.equal(*aux['direction_gates'])
    torch.testing.assert_close(at(masked, pos), pruned, **TOL)

    vim = vim_mixer(direction_gate=True).eval()
    decisive_gate(vim, seed=2)
    L, cls = 13, 6
    x = torch.randn(4, L, 16, dtype=F64)
    pos = vim_kept_positions(4, 7, L, cls)
    aux = {}
    masked, _ = vim(
        x,
        token_mask=mask_of(pos, L),
        gap_mode=gap_mode,
        cls_index=cls,
        aux=aux,
    )
    slot = (pos < cls).sum(-1)
    pruned, _ = vim(at(x, pos), pos, L, gap_mode, cls_index=slot, aux=aux)
    assert torch.equal(*aux['direction_gates'])
    torch.testing.assert_close(at(masked, pos), pruned, **TOL)


# --------------------------------------------------------------------------
# Layers and backbones.
# --------------------------------------------------------------------------
def test_layers_pass_the_contract_through():
    torch.manual_seed(7)
    layer = VimBlock(16, dict(d_state=4, direction_gate=True)).to(F64)
    x = torch.randn(2, 9, 16, dtype=F64)
    aux = {}
    layer.eval()
    layer(x, token_mask=torch.ones(2, 9, dtype=F64), cls_index=4, aux=aux)
    assert tuple(aux['direction_gates'][0].shape) == (2, 2)
    pm = PlainMambaLayer(8, dict(d_state=4, conv_size=3, direction_gate=True))
    pm = pm.to(F64).eval()
    pm(
        torch.randn(2, 6, 8, dtype=F64),
        (2, 3),
        token_mask=torch.ones(2, 6),
        aux=aux,
    )
    assert tuple(aux['direction_gates'][1].shape) == (2, 4)


@pytest.mark.parametrize('family', ['vim', 'plainmamba'])
def test_backbones_build_gates(family):
    cls = Vim if family == 'vim' else PlainMamba
    model = cls(tiny_arch(family), img_size=64, direction_gate=True)
    gates = [m for m in model.modules() if isinstance(m, DirectionGate)]
    assert len(gates) == model.num_layers
    assert {g.num_directions for g in gates} == {2 if family == 'vim' else 4}
    plain = cls(tiny_arch(family), img_size=64)
    assert not any(isinstance(m, DirectionGate) for m in plain.modules())
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    plain.load_state_dict(model.state_dict(), strict=False)
    plain.eval()
    for a, b in zip(model(x), plain(x)):  # init: all directions on
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_vim_layer_kwargs_class_slot():
    """The class token's slot among the kept tokens, where the gates read."""
    model = Vim(
        tiny_arch('vim'),
        img_size=64,
        direction_gate=True,
        prune_cfg=dict(layers=(2,), keep_ratios=0.5),
    ).eval()
    state = model.init_tokens(torch.randn(2, 3, 64, 64))
    assert model.layer_kwargs(state)['cls_index'] == state.cls_index == 8
    state = model.run_layers(state, 0, 2)
    slot = model.layer_kwargs(state)['cls_index']
    assert torch.equal(
        state.index.gather(1, slot[:, None])[:, 0], torch.full((2,), 8)
    )


@pytest.mark.parametrize('family', ['vim', 'plainmamba'])
def test_checkpointed_layers_record_their_gates_once(family):
    """With ``with_cp`` the backward pass recomputes each layer; its gate
    decisions are recorded by the forward only, and equal the unchecked
    model's (the checkpoint restores the RNG state)."""
    cls = Vim if family == 'vim' else PlainMamba
    x = torch.randn(2, 3, 64, 64)
    recorded = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = cls(
            tiny_arch(family),
            img_size=64,
            direction_gate=dict(init_bias=0.0),
            with_cp=with_cp,
        )
        model.train()
        torch.manual_seed(1)
        sum(o.sum() for o in model(x.requires_grad_())).backward()
        recorded.append(model.aux_outputs['direction_gates'])
    assert len(recorded[1]) == len(recorded[0]) == model.num_layers
    for a, b in zip(*recorded):
        assert torch.equal(a, b)
