"""DyVM's classifier (``mmssm.DyVMClassifier``): its loss terms, each under
its own name and equal to its formula, and the frozen dense teacher."""

import os.path as osp
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from mmengine.registry import DefaultScope

from mmssm.errors import UserError
from mmssm.models.classifiers.dyvm_classifier import DyVMClassifier
from mmssm.registry import MODELS
from mmssm.testing import tiny_backbone_cfg

LOSS_KEYS = {
    'loss_cls',
    'loss_token_ratio',
    'loss_direction_ratio',
    'loss_distill_kl',
    'loss_distill_tokens',
}


def backbone_cfg(kind='vim', gate=True, **kwargs):
    cfg = tiny_backbone_cfg(
        kind,
        out_type='cls_token' if kind == 'vim' else 'avg_featmap',
        prune_cfg=dict(
            type='mmssm.LearnedTokenPruner', layers=(1, 2), keep_ratios=0.7
        ),
        direction_gate=gate,
        **kwargs,
    )
    if kind == 'plainmamba':
        cfg['norm_eval'] = True
    return cfg


def build(kind='vim', gate=True, **kwargs):
    torch.manual_seed(0)
    cfg = dict(
        type='mmssm.DyVMClassifier',
        backbone=backbone_cfg(kind, gate),
        head=dict(
            type='LinearClsHead',
            num_classes=4,
            in_channels=16,
            loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        ),
        **kwargs,
    )
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(cfg)
    model.init_weights()
    return model


def samples(labels):
    from mmpretrain.structures import DataSample

    return [DataSample().set_gt_label(int(y)) for y in labels]


@pytest.mark.parametrize('kind', ['vim', 'plainmamba'])
def test_every_term_logged_and_equal_to_its_formula(kind):
    """Each term, recomputed by hand from a forward with the same random
    decisions (same seed), as DyVM's losses.py computes it."""
    model = build(kind).train()
    x = torch.randn(4, 3, 64, 64)
    labels = torch.tensor([0, 1, 2, 3])
    torch.manual_seed(5)
    losses = model.loss(x, samples(labels))
    assert LOSS_KEYS <= set(losses)

    torch.manual_seed(5)
    backbone = model.backbone
    s_logits = model.head(model.extract_feat(x))
    decisions = backbone.aux_outputs['token_decisions']
    gates = backbone.aux_outputs['direction_gates']
    assert len(decisions) == 2 and len(gates) == 4
    with torch.no_grad():
        t_logits = model.teacher.head(model.teacher.extract_feat(x))

    expected = dict(
        loss_cls=F.cross_entropy(s_logits, labels),
        loss_token_ratio=10
        * sum(
            ((d.mean(1) - r) ** 2).mean()
            for d, r in zip(decisions, [0.7, 0.49])
        )
        / 2,
        loss_direction_ratio=10
        * (torch.cat([g.flatten() for g in gates]).mean() - 0.8) ** 2,
        loss_distill_kl=0.5
        * (
            F.softmax(t_logits, 1)
            * (F.log_softmax(t_logits, 1) - F.log_softmax(s_logits, 1))
        )
        .sum(1)
        .mean(),
    )
    for key, value in expected.items():
        torch.testing.assert_close(losses[key], value, msg=key)


@pytest.mark.parametrize('kind', ['vim', 'plainmamba'])
def test_token_distillation_compares_kept_tokens_at_their_positions(kind):
    model = build(kind).train()
    x = torch.randn(2, 3, 64, 64)
    losses = model.loss(x, samples([0, 1]))
    backbone = model.backbone
    state = backbone.final_state
    student = backbone.final_tokens(state)
    with torch.no_grad():
        model.teacher.extract_feat(x)
    t_backbone = model.teacher.backbone
    teacher = t_backbone.final_tokens(t_backbone.final_state)
    kept = state.kept_mask()
    if state.cls_index is not None:  # the class token is not distilled
        kept[:, state.cls_index] = False
    expected = 0.5 * (student - teacher)[kept].pow(2).mean()
    torch.testing.assert_close(losses['loss_distill_tokens'], expected)
    # fewer tokens than the full grid are compared
    assert kept.sum() < kept.numel() - 2


def test_grads_reach_the_student_never_the_teacher():
    model = build('vim').train()
    losses = model.loss(torch.randn(4, 3, 64, 64), samples([0, 1, 2, 3]))
    sum(losses.values()).backward()
    params = dict(model.named_parameters())
    assert not any(k.startswith('teacher') for k in params)
    assert not any(k.startswith('teacher') for k in model.state_dict())
    for name, p in params.items():
        if 'predictors' in name or 'direction_gate' in name:
            assert p.grad is not None, name
    for p in model.teacher.parameters():
        assert not p.requires_grad and p.grad is None
    assert not model.teacher.training and model.training
    model.double()
    assert next(model.teacher.parameters()).dtype == torch.float64


def test_teacher_from_the_dense_checkpoint(tmp_path):
    student = build('vim')
    dense = {
        k: torch.randn_like(v) for k, v in student.teacher.state_dict().items()
    }
    path = str(tmp_path / 'dense.pth')
    torch.save(dict(state_dict=dense), path)
    model = build('vim', teacher=dict(checkpoint=path))
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, dense[k]), k
    # a checkpoint of another model is refused, naming its keys
    torch.save(dict(state_dict={'backbone.foo': torch.ones(1)}), path)
    with pytest.raises(UserError, match='foo'):
        build('vim', teacher=dict(checkpoint=path))


def test_terms_switch_off_and_bad_configs():
    model = build(
        'vim',
        gate=False,
        direction_ratio_loss=None,
        distill_kl_loss=None,
        distill_tokens_loss=None,
        teacher=None,
    ).train()
    losses = model.loss(torch.randn(2, 3, 64, 64), samples([0, 1]))
    assert set(losses) == {'loss_cls', 'loss_token_ratio'}
    with pytest.raises(UserError, match='need a teacher'):
        build('vim', teacher=None)
    model = build('vim', gate=False).train()
    with pytest.raises(UserError, match='direction_gate=True'):
        model.loss(torch.randn(2, 3, 64, 64), samples([0, 1]))


def test_predict_runs_the_pruned_inference():
    model = build('vim').eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), mode='tensor')
    assert out.shape == (2, 4)
    state = model.backbone.final_state
    assert not state.masked and state.tokens.shape[1] == int(0.49 * 16) + 1


def test_a_registered_class_imported_by_the_configs_only():
    """``mmssm.DyVMClassifier`` is the class itself, in a module that
    ``import mmssm.models`` does not load (no mmpretrain for dense-prediction
    users); a DyVM config's ``custom_imports`` registers it."""
    assert MODELS.get('DyVMClassifier') is DyVMClassifier
    assert isinstance(build('vim'), DyVMClassifier)
    config = 'configs/dyvm/dyvm_vim-t_8xb64-30e_in1k.py'
    code = (
        'import sys\n'
        'import mmssm, mmssm.models, mmssm.engine\n'
        'from mmssm.registry import MODELS\n'
        "print('mmpretrain' in sys.modules, MODELS.get('DyVMClassifier'))\n"
        'from mmengine.config import Config\n'
        f'Config.fromfile({config!r})\n'
        "print(MODELS.get('DyVMClassifier').__module__)\n"
    )
    root = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    out = subprocess.run(
        [sys.executable, '-W', 'ignore', '-c', code],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        'False',
        'None',
        'mmssm.models.classifiers.dyvm_classifier',
    ]
