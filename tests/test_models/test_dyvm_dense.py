"""DyVM's learned pruning in detection and segmentation: the auxiliary
losses in the loss dict of mmdet's and mmseg's models
(``mmssm.DyVMAuxLossHook``), and training that equals inference through
the ViT-Adapter."""

import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

from mmssm.engine.hooks import DyVMAuxLossHook
from mmssm.errors import UserError

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
MINI_DET = osp.join(
    ROOT,
    'configs',
    'mask_rcnn',
    'mask-rcnn_plainmamba-l1-prune_adapter-fpn_1xb2-mini_coco-persons.py',
)
MINI_SEG = osp.join(
    ROOT,
    'configs',
    'upernet',
    'upernet_plainmamba-l1-prune_adapter_1xb2-mini_ade20k-256x256.py',
)
AUX_LOSSES = ('loss_token_ratio', 'loss_direction_ratio')
KEEP = ('token_keep', 'direction_keep')  # logged, not summed


def learned(cfg: Config) -> None:
    """The shrunk backbone of a config with DyVM's learned pruning (one step
    after layer 2) and direction gates."""
    backbone = cfg.model.backbone
    if backbone.type == 'mmssm.ViTAdapter':
        backbone = backbone.backbone
    backbone.prune_cfg = dict(
        type='mmssm.LearnedTokenPruner', layers=(2,), keep_ratios=0.7
    )
    backbone.direction_gate = True


def run_two_iterations(cfg: Config, tmp_path, monkeypatch) -> dict:
    """``runner.train()`` of two iterations; the logged scalars."""
    from mmssm.engine.runner import Runner

    monkeypatch.chdir(ROOT)  # the mini sets' paths are relative
    cfg.work_dir = str(tmp_path)
    cfg.default_hooks.checkpoint = dict(interval=100, save_last=False)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.test_cfg = cfg.test_dataloader = cfg.test_evaluator = None
    if cfg.train_cfg.get('by_epoch', 'max_epochs' in cfg.train_cfg):
        # 4 images, 2 per batch: one epoch of 2 iterations
        cfg.train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=1)
    else:
        cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=2)
    cfg.param_scheduler = []
    runner = Runner.from_cfg(cfg)
    runner.train()
    hook = [h for h in runner.hooks if isinstance(h, DyVMAuxLossHook)]
    assert len(hook) == 1 and hook[0]._handle is None  # removed after
    assert runner.iter == 2
    return runner.message_hub.log_scalars


@pytest.mark.parametrize('dynamic', [True, False])
@pytest.mark.parametrize('task', ['det', 'seg'])
def test_aux_losses_reach_the_loss_dict(
    task, dynamic, configs, tmp_path, monkeypatch
):
    """A shrunk Mask R-CNN and UperNet (adapter) with learned pruning and
    direction gates log ``loss_token_ratio`` and ``loss_direction_ratio``
    in two training iterations (the runtime's default hook, DyVM's
    segmentation weights); the same models with a dense backbone log
    neither."""
    cfg = Config.fromfile(MINI_DET if task == 'det' else MINI_SEG)
    if task == 'det':
        configs.shrink_detector(cfg)
    else:
        configs.shrink_backbone(cfg)
        for head in (cfg.model.decode_head, cfg.model.auxiliary_head):
            head.update(channels=16)
        cfg.model.decode_head.in_channels = [64] * 4
        cfg.model.auxiliary_head.in_channels = 64
    if dynamic:
        learned(cfg)
    else:
        cfg.model.backbone.backbone.prune_cfg = None
    scope = 'mmdet' if task == 'det' else 'mmseg'
    with DefaultScope.overwrite_default_scope(scope):
        scalars = run_two_iterations(cfg, tmp_path, monkeypatch)
    for name in AUX_LOSSES + KEEP:
        logged = f'train/{name}' in scalars
        assert logged is dynamic, name
        if dynamic:
            values = scalars[f'train/{name}'].data[0]
            assert len(values) == 2 and all(v >= 0 for v in values)


def _tiny_vim(**kwargs):
    from mmssm.models.backbones import Vim
    from mmssm.testing import tiny_arch

    return Vim(
        arch=tiny_arch('vim', cls_token=None), img_size=64, **kwargs
    ).train()


def test_hook_weights_targets_and_modes():
    """The weights and target are the hook's config fields; only
    ``mode='loss'`` gets the losses; the values are the loss modules' on
    the backbone's aux outputs."""
    hook = DyVMAuxLossHook(
        token_ratio_loss=dict(type='mmssm.TokenRatioLoss', loss_weight=3.0),
        direction_ratio_loss=dict(
            type='mmssm.DirectionRatioLoss', target=0.5, loss_weight=2.0
        ),
    )
    assert DyVMAuxLossHook().token_ratio_loss.loss_weight == 20.0
    assert DyVMAuxLossHook().direction_ratio_loss.target == 0.8

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = _tiny_vim(
                prune_cfg=dict(
                    type='mmssm.LearnedTokenPruner',
                    layers=(2,),
                    keep_ratios=0.5,
                ),
                direction_gate=True,
            )

        def forward(self, inputs, data_samples=None, mode='tensor'):
            out = self.backbone(inputs)
            return dict(loss_x=out[-1].mean()) if mode == 'loss' else out

    model = Model()
    assert hook.register(model)
    x = torch.randn(2, 3, 64, 64)
    losses = model(x, None, 'loss')
    aux = model.backbone.aux_outputs
    (d,) = aux['token_decisions']
    expected_t = 3.0 * ((d.mean(1) - 0.5) ** 2).mean()
    gates = torch.stack([g.mean() for g in aux['direction_gates']]).mean()
    expected_b = 2.0 * (gates - 0.5) ** 2
    torch.testing.assert_close(losses['loss_token_ratio'], expected_t)
    torch.testing.assert_close(losses['loss_direction_ratio'], expected_b)
    torch.testing.assert_close(losses['token_keep'], d.mean())
    torch.testing.assert_close(losses['direction_keep'], gates)
    losses['loss_token_ratio'].backward()  # reaches the predictor
    grads = [p.grad for p in model.backbone.pruner.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert isinstance(model(x, mode='tensor'), tuple)
    assert set(model(x, None, mode='loss')) == {'loss_x', *AUX_LOSSES, *KEEP}
    hook.remove()
    assert set(model(x, None, mode='loss')) == {'loss_x'}

    # switched off one by one
    off = DyVMAuxLossHook(token_ratio_loss=None)
    assert off.register(model)
    assert set(model(x, None, mode='loss')) == {
        'loss_x',
        'loss_direction_ratio',
        *KEEP,
    }
    off.remove()
    # a dense backbone: nothing registered
    model.backbone = _tiny_vim()
    assert not DyVMAuxLossHook().register(model)
    # a model with its own (DyVMClassifier): left alone
    model.backbone = _tiny_vim(direction_gate=True)
    model.direction_ratio_loss = None
    assert not DyVMAuxLossHook().register(model)
    del model.direction_ratio_loss
    # two mmssm backbones: refused
    model.other = _tiny_vim()
    with pytest.raises(UserError, match='2 mmssm backbones'):
        DyVMAuxLossHook().register(model)


# --------------------------------------------------------------------------
# Training equals inference through the adapter
# --------------------------------------------------------------------------
def _learned_adapter(kind: str, align: bool):
    """A tiny adapter (float64) around a backbone with a learned pruner
    that takes given scores (its inference top-k is then also the training
    decision: two steps, 0.7 and 0.49 of the 24 tokens) and direction
    gates, every parameter moved off its init."""
    from mmssm.models.backbones import ViTAdapter
    from mmssm.models.layers.direction_gate import DirectionGate
    from mmssm.testing import tiny_backbone_cfg

    torch.manual_seed(0)
    changes = dict(embed_dims=32)
    changes.update(conv_size=7 if kind == 'plainmamba' else {})
    if kind == 'vim':
        changes = dict(embed_dims=32, cls_token=None)
    backbone = dict(
        tiny_backbone_cfg(kind, changes),
        prune_cfg=dict(
            type='mmssm.LearnedTokenPruner',
            layers=(2, 3),
            keep_ratios=0.7,
            align=align,
            scorer='given',
        ),
        direction_gate=True,
    )
    model = ViTAdapter(backbone=backbone, conv_inplane=8, deform_num_heads=2)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith('num_batches_tracked'):
                continue
            noise = torch.randn(t.shape, generator=gen, dtype=t.dtype)
            if name.endswith('running_var'):
                t.copy_(1 + 0.1 * noise.abs())
            else:
                t.add_(0.1 * noise)
        for m in model.modules():
            if isinstance(m, DirectionGate):
                # bits that differ per image and depend on the pooled mean
                m.fc.bias.zero_()
                m.fc.weight.normal_(0, 1, generator=gen)
    return model.double()


def _train_mode_without_noise(model):
    """Training mode (masked pruning), but batch norms on their running
    statistics and direction gates on their thresholds, so that the two
    modes differ only in how the pruned tokens are handled."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from mmssm.models.layers.direction_gate import DirectionGate

    model.train()
    for m in model.modules():
        if isinstance(m, (_BatchNorm, DirectionGate)):
            m.eval()


@pytest.mark.parametrize('align', [False, True])
@pytest.mark.parametrize('kind', ['plainmamba', 'vim'])
def test_adapter_training_equals_inference(kind, align):
    """With the same decisions, the adapter's training-mode forward (full
    length, pruned tokens masked, frozen and filled back) equals its
    inference-mode forward with the tokens deleted: the four full-grid
    maps, the backbone's last full grid, the kept tokens and the gates
    (read as the mean over the kept tokens in both modes), in float64."""
    model = _learned_adapter(kind, align)
    backbone = model.backbone
    gen = torch.Generator().manual_seed(1)
    backbone.pruner.scorer.scores = torch.rand(3, 24, generator=gen).double()
    x = torch.randn(3, 3, 64, 96, generator=gen, dtype=torch.float64)

    from mmssm.models.layers.direction_gate import DirectionGate

    pooled = []  # what each gate reads, per forward
    for m in model.modules():
        if isinstance(m, DirectionGate):
            m.fc.register_forward_hook(lambda m, a, o: pooled.append(a[0]))

    _train_mode_without_noise(model)
    train_outs = model(x)
    train_pooled, pooled[:] = list(pooled), []
    train_state = backbone.final_state
    train_aux = backbone.aux_outputs
    assert train_state.masked
    assert [d.shape for d in train_aux['token_decisions']] == [(3, 24)] * 2
    assert [int(d[0].sum()) for d in train_aux['token_decisions']] == [16, 11]

    model.eval()
    with torch.no_grad():
        eval_outs = model(x)
    eval_state = backbone.final_state
    eval_aux = backbone.aux_outputs
    assert not eval_state.masked and eval_state.tokens.shape[1] == 11

    assert torch.equal(train_state.kept_mask(), eval_state.kept_mask())
    kept = eval_state.kept_mask()
    for a, b in zip(train_outs, eval_outs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        train_state.full(), eval_state.full(), rtol=0, atol=1e-10
    )
    torch.testing.assert_close(
        train_state.full()[kept], eval_state.full()[kept], rtol=0, atol=1e-10
    )
    assert len(pooled) == len(train_pooled) == 4
    for a, b in zip(train_pooled, pooled):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    train_gates = torch.stack(train_aux['direction_gates'])
    eval_gates = torch.stack(eval_aux['direction_gates'])
    assert torch.equal(train_gates.detach(), eval_gates)
    assert 0 < float(eval_gates.mean()) < 1  # the gates decide something


# --------------------------------------------------------------------------
# The synthetic-shapes configs (issue 13's CPU run)
# --------------------------------------------------------------------------
def _shapes_config(pruning: str) -> str:
    return osp.join(
        ROOT,
        'configs',
        'mask_rcnn',
        f'mask-rcnn_plainmamba-l1{pruning}_adapter-fpn_1xb4-'
        'synthetic_coco-shapes.py',
    )


def test_shapes_configs_differ_only_in_the_pruning():
    """The dense, 'paper'-pruned (the main job's) and DyVM shapes configs
    are one set of CPU settings: they differ only in the backbone's
    pruning (and the DyVM run validates every 100 iterations)."""
    dense = Config.fromfile(_shapes_config('')).to_dict()
    paper = Config.fromfile(_shapes_config('-prune')).to_dict()
    dyvm = Config.fromfile(_shapes_config('-dyvm')).to_dict()
    backbones = [c['model']['backbone']['backbone'] for c in (paper, dyvm)]
    assert 'prune_cfg' not in dense['model']['backbone']['backbone']
    assert backbones[0].pop('prune_cfg') == 'paper'
    assert backbones[1].pop('prune_cfg') == dict(
        type='mmssm.LearnedTokenPruner',
        layers=(6, 12, 18),
        keep_ratios=0.8,
        align=False,
    )
    assert backbones[1].pop('direction_gate') is True
    assert dyvm['train_cfg'].pop('val_interval') == 100
    assert dense['train_cfg'].pop('val_interval') == 300
    del paper['train_cfg']['val_interval']
    dyvm.pop('dyvm_prune_cfg')
    assert dense == paper == dyvm


def test_shapes_dyvm_config_trains(configs, tmp_path, monkeypatch):
    """The DyVM shapes config, shrunk, trains two iterations on a small
    synthetic set with ``mmssm.Runner`` and logs the ratio losses and the
    kept fractions."""
    from mmssm.datasets.synthetic_coco import make_synthetic_coco

    data = str(tmp_path / 'shapes')
    make_synthetic_coco(data, num_train=4, num_val=2, image_size=64)
    cfg = configs.shrink_detector(Config.fromfile(_shapes_config('-dyvm')))
    assert cfg.model.backbone.backbone.prune_cfg.type == (
        'mmssm.LearnedTokenPruner'
    )
    cfg.train_dataloader.dataset.data_root = data
    with DefaultScope.overwrite_default_scope('mmdet'):
        scalars = run_two_iterations(cfg, tmp_path / 'work', monkeypatch)
    for name in AUX_LOSSES + KEEP:
        values = scalars[f'train/{name}'].data[0]
        assert len(values) == 2 and all(v >= 0 for v in values), name
    assert all(0 < v <= 1 for v in scalars['train/token_keep'].data[0])
