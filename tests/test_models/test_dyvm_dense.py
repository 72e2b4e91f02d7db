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
    for name in AUX_LOSSES:
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
    losses['loss_token_ratio'].backward()  # reaches the predictor
    grads = [p.grad for p in model.backbone.pruner.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert isinstance(model(x, mode='tensor'), tuple)
    assert set(model(x, None, mode='loss')) == {'loss_x', *AUX_LOSSES}
    hook.remove()
    assert set(model(x, None, mode='loss')) == {'loss_x'}

    # switched off one by one
    off = DyVMAuxLossHook(token_ratio_loss=None)
    assert off.register(model)
    assert set(model(x, None, mode='loss')) == {
        'loss_x',
        'loss_direction_ratio',
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
