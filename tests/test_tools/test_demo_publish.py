"""mmdet's and mmseg's entry points, the demo and publish_model.py.

A shrunk detector (the mini COCO config) is trained for one iteration in
process with ``mmssm.PruningMetaHook``; its checkpoint is published, loaded
by mmdet's ``init_detector`` and run by ``inference_detector`` and the
demo. A shrunk UperNet (the mini ADE20K config) is saved from the built
model and run by mmseg's ``init_model``/``inference_model`` and the demo.
"""

import hashlib
import os
import os.path as osp
import re

import cv2
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

from mmssm.engine.hooks import pruning_meta

IMG = 'data/images/color.jpg'  # 400 x 300
# the tiny PlainMamba of the tool tests (tools.backbone_shrink, see
# tests/test_tools/conftest.py) under a tiny UperNet; the test images
# resized to fit 512 x 128
SEG_HEADS = {
    'model.decode_head.in_channels': [64] * 4,
    'model.decode_head.channels': 32,
    'model.auxiliary_head.in_channels': 64,
    'model.auxiliary_head.channels': 16,
    'test_pipeline.1.scale': (512, 128),
}
# the schedule of the tiny backbone: pruned after its 2nd layer, keep 0.5
TINY_PRUNING = {
    'backbone.backbone': dict(
        type='PlainMamba',
        num_layers=4,
        layers=[2],
        keep_ratios=[0.5],
        scorer='clip',
        align=True,
        gap_mode='prev',
    )
}


@pytest.fixture
def scope():
    """A default scope for the test's in-process runs, restored after it
    (mmdet's and mmseg's APIs set the scope of their config for good)."""
    return DefaultScope.overwrite_default_scope


@pytest.fixture(scope='module')
def demo(tools):
    return tools.load_script('demo/image_demo.py')


@pytest.fixture(scope='module')
def publish_model(tools):
    return tools.load_script('tools/model_converters/publish_model.py')


def _seg_shrink(tools) -> dict:
    return {**tools.backbone_shrink, **SEG_HEADS}


def _det_cfg(tools) -> Config:
    cfg = Config.fromfile(osp.join(tools.root, tools.mini_cfg))
    cfg.merge_from_dict(tools.shrink)
    return cfg


@pytest.fixture(scope='module')
def det_run(tools, tmp_path_factory):
    """One iteration (one image) of the shrunk mini detector, in process."""
    from mmengine.runner import Runner

    work_dir = tmp_path_factory.mktemp('det_run')
    cwd = os.getcwd()
    os.chdir(tools.root)  # the config's data paths are relative
    try:
        cfg = _det_cfg(tools)
        cfg.merge_from_dict(
            {
                'train_cfg.max_epochs': 1,
                'train_dataloader.batch_size': 1,
                'train_dataloader.dataset.indices': 1,
                'work_dir': str(work_dir),
            }
        )
        cfg.custom_hooks = [dict(type='mmssm.PruningMetaHook')]
        # no validation (mmengine validates after the last epoch)
        cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
        with DefaultScope.overwrite_default_scope(cfg.default_scope):
            Runner.from_cfg(cfg).train()
    finally:
        os.chdir(cwd)
    return work_dir


@pytest.fixture(scope='module')
def published(det_run, publish_model, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp('published')
    publish_model.main([str(det_run / 'epoch_1.pth'), str(out_dir)])
    (path,) = out_dir.glob('*.pth')
    return path


def test_checkpoint_meta_has_dataset_meta_and_pruning(det_run):
    ckpt = torch.load(
        det_run / 'epoch_1.pth', map_location='cpu', weights_only=True
    )
    meta = ckpt['meta']
    # mmengine's Runner saves the training set's metainfo
    assert meta['dataset_meta']['classes'] == ('person',)
    # mmssm.PruningMetaHook: the resolved schedule (prune_cfg='paper' of
    # the shrunk arch), by module name
    assert meta['pruning'] == TINY_PRUNING
    (log,) = det_run.glob('*/*.log')
    assert (
        'token pruning: backbone.backbone: PlainMamba pruned after layers '
        '[2] keeping [0.5]' in log.read_text()
    )


def test_pruning_meta_of_dense_naive_and_other_models():
    from mmssm.models.backbones import PlainMamba

    arch = dict(
        embed_dims=32,
        num_layers=3,
        num_convs=1,
        dw_layers=[],
        d_state=4,
        expand=1,
        conv_size=3,
    )
    dense = PlainMamba(arch=arch)
    assert pruning_meta(dense) == {'': None}
    naive = PlainMamba(
        arch=arch, prune_cfg=dict(layers=[1], keep_ratios=0.7, align=False)
    )
    meta = pruning_meta(torch.nn.Sequential(naive))['0']
    assert meta['layers'] == [1] and meta['keep_ratios'] == [0.7]
    assert meta['align'] is False and meta['num_layers'] == 3
    assert pruning_meta(torch.nn.Linear(2, 2)) == {}


def test_publish_keeps_meta_and_state_dict(det_run, published):
    src = torch.load(
        det_run / 'epoch_1.pth', map_location='cpu', weights_only=True
    )
    stamp = re.fullmatch(
        r'(.+)_(\d{8}_\d{6})', src['meta']['experiment_name']
    ).group(2)
    cfg_name = (
        'mask-rcnn_plainmamba-l1-prune_adapter-fpn_1xb2-mini_coco-persons'
    )
    match = re.fullmatch(
        re.escape(f'{cfg_name}_{stamp}') + r'-([0-9a-f]{8})\.pth',
        published.name,
    )
    assert match, published.name
    digest = hashlib.sha256(published.read_bytes()).hexdigest()
    assert digest[:8] == match.group(1)
    out = torch.load(published, map_location='cpu', weights_only=True)
    assert set(out) == {'meta', 'state_dict'}
    assert {'optimizer', 'message_hub'} <= set(src)
    assert out['meta']['pruning'] == TINY_PRUNING
    assert out['meta']['dataset_meta'] == src['meta']['dataset_meta']
    assert out['state_dict'].keys() == src['state_dict'].keys()
    for key, value in src['state_dict'].items():
        assert torch.equal(out['state_dict'][key], value), key
    # no temporary file left behind
    assert [p.name for p in published.parent.iterdir()] == [published.name]


def test_publish_refuses_to_overwrite(det_run, published, publish_model):
    before = published.read_bytes()
    with pytest.raises(SystemExit) as e:
        publish_model.main(
            [str(det_run / 'epoch_1.pth'), str(published.parent)]
        )
    assert 'exists already; not overwritten' in str(e.value)
    assert published.read_bytes() == before
    assert [p.name for p in published.parent.iterdir()] == [published.name]


def test_publish_names_without_experiment_name(publish_model, tmp_path):
    src = tmp_path / 'converted.pth'
    torch.save(dict(state_dict={'w': torch.ones(2)}, meta={}), src)
    with pytest.raises(SystemExit) as e:
        publish_model.main([str(src), str(tmp_path / 'out')])
    assert '--config' in str(e.value)
    publish_model.main(
        [
            str(src),
            str(tmp_path / 'out'),
            '--config',
            'configs/vim/vim-t_8xb64_in1k.py',
            '--timestamp',
            '20240102_030405',
        ]
    )
    (path,) = (tmp_path / 'out').glob('*.pth')
    assert re.fullmatch(
        r'vim-t_8xb64_in1k_20240102_030405-[0-9a-f]{8}\.pth', path.name
    )
    with pytest.raises(SystemExit) as e:
        publish_model.main(
            [str(src), str(tmp_path), '--config', 'x', '--timestamp', '2024']
        )
    assert 'not YYYYMMDD_HHMMSS' in str(e.value)
    torch.save({'w': torch.ones(2)}, tmp_path / 'bare.pth')
    with pytest.raises(SystemExit) as e:
        publish_model.main([str(tmp_path / 'bare.pth'), str(tmp_path)])
    assert "has no 'state_dict'" in str(e.value)


def test_init_detector_and_inference_detector(tools, published, scope):
    from mmdet.apis import inference_detector, init_detector

    cwd = os.getcwd()
    os.chdir(tools.root)
    try:
        with scope('mmdet'):
            model = init_detector(
                _det_cfg(tools), str(published), device='cpu'
            )
            result = inference_detector(model, IMG)
    finally:
        os.chdir(cwd)
    assert model.dataset_meta['classes'] == ('person',)  # from the meta
    assert pruning_meta(model) == TINY_PRUNING
    pred = result.pred_instances
    assert result.ori_shape == (300, 400)
    assert len(pred.bboxes) == len(pred.scores) == len(pred.masks) > 0
    assert pred.masks.shape[-2:] == (300, 400)


def test_demo_draws_detections(tools, published, tmp_path):
    out_file = tmp_path / 'det.png'
    result = tools.run(
        [
            'demo/image_demo.py',
            IMG,
            tools.mini_cfg,
            str(published),
            '--out-file',
            str(out_file),
            '--device',
            'cpu',
            '--score-thr',
            '0',
            *tools.cfg_options(tools.shrink),
        ]
    )
    tools.check_ok(result)
    assert f'result written to {out_file}' in result.stdout
    assert 'token pruning: backbone.backbone: PlainMamba' in (
        result.stdout + result.stderr
    )
    drawn = cv2.imread(str(out_file))
    assert drawn is not None and drawn.shape == (300, 400, 3)
    assert not (drawn == cv2.imread(osp.join(tools.root, IMG))).all()


def test_demo_refuses_a_checkpoint_with_wrong_keys(
    tools, demo, published, tmp_path
):
    ckpt = torch.load(published, map_location='cpu', weights_only=True)
    state_dict = ckpt['state_dict']
    missing = 'rpn_head.rpn_cls.weight'
    del state_dict[missing]
    state_dict['backbone.backbone.no_such.weight'] = torch.zeros(1)
    bad = tmp_path / 'bad.pth'
    torch.save(ckpt, bad)
    cwd = os.getcwd()
    os.chdir(tools.root)
    try:
        with pytest.raises(SystemExit) as e:
            demo.main(
                [
                    IMG,
                    tools.mini_cfg,
                    str(bad),
                    '--device',
                    'cpu',
                    '--out-file',
                    str(tmp_path / 'x.png'),
                    *tools.cfg_options(tools.shrink),
                ]
            )
    finally:
        os.chdir(cwd)
    message = str(e.value)
    assert message.startswith('error: checkpoint')
    assert f'missing keys: {missing}' in message
    assert 'unexpected keys: backbone.backbone.no_such.weight' in message
    assert not (tmp_path / 'x.png').exists()


# ---------------------------------------------------------------- mmseg
@pytest.fixture(scope='module')
def seg_ckpt(tools, tmp_path_factory):
    """A checkpoint of the shrunk mini UperNet, saved from the built model.

    Its meta is what mmengine's Runner and PruningMetaHook write: the
    data set's metainfo and the pruning schedule.
    """
    from mmseg.registry import DATASETS, MODELS

    cfg = Config.fromfile(osp.join(tools.root, tools.seg_cfg))
    cfg.merge_from_dict(_seg_shrink(tools))
    dataset = dict(cfg.test_dataloader.dataset, lazy_init=True)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = MODELS.build(cfg.model)
        model.init_weights()
        dataset_meta = DATASETS.build(dataset).metainfo
    meta = dict(dataset_meta=dataset_meta, pruning=pruning_meta(model))
    path = tmp_path_factory.mktemp('seg') / 'upernet.pth'
    torch.save(dict(meta=meta, state_dict=model.state_dict()), path)
    return path


def test_init_model_and_inference_model(tools, seg_ckpt, scope):
    from mmseg.apis import inference_model, init_model

    cfg = Config.fromfile(osp.join(tools.root, tools.seg_cfg))
    cfg.merge_from_dict(_seg_shrink(tools))
    with scope('mmseg'):
        model = init_model(cfg, str(seg_ckpt), device='cpu')
        result = inference_model(model, osp.join(tools.root, IMG))
    assert len(model.dataset_meta['classes']) == 150  # ADE20K, from meta
    assert pruning_meta(model) == TINY_PRUNING
    seg = result.pred_sem_seg.data
    assert seg.shape == (1, 300, 400)
    assert 0 <= int(seg.min()) and int(seg.max()) < 150
    # the same with mmssm's loaders (which name a bad file) in the pipeline
    # (from a fresh config: inference_model removed LoadAnnotations from
    # model.cfg.test_pipeline)
    pipeline = Config.fromfile(
        osp.join(tools.root, tools.seg_cfg)
    ).test_pipeline
    swap = {
        'LoadImageFromFile': 'mmssm.LoadImageFromFile',
        'LoadAnnotations': 'mmssm.LoadSegAnnotations',
    }
    assert {t['type'] for t in pipeline} >= set(swap)
    pipeline = [dict(t, type=swap.get(t['type'], t['type'])) for t in pipeline]
    pipeline[1]['scale'] = SEG_HEADS['test_pipeline.1.scale']
    model.cfg.test_pipeline = pipeline
    with scope('mmseg'):
        again = inference_model(model, osp.join(tools.root, IMG))
    assert torch.equal(again.pred_sem_seg.data, seg)


def test_demo_draws_a_label_map(tools, demo, seg_ckpt, tmp_path, capsys):
    out_file = tmp_path / 'seg.png'
    cwd = os.getcwd()
    os.chdir(tools.root)
    try:
        demo.main(
            [
                IMG,
                tools.seg_cfg,
                str(seg_ckpt),
                '--out-file',
                str(out_file),
                '--device',
                'cpu',
                *tools.cfg_options(_seg_shrink(tools)),
            ]
        )
    finally:
        os.chdir(cwd)
    assert f'result written to {out_file}' in capsys.readouterr().out
    drawn = cv2.imread(str(out_file))
    assert drawn is not None and drawn.shape == (300, 400, 3)


def test_demo_refuses_bad_input(tools, demo, seg_ckpt, tmp_path):
    corrupt = tmp_path / 'corrupt.jpg'
    corrupt.write_bytes(open(osp.join(tools.root, IMG), 'rb').read()[:999])
    for img, text in (
        (str(tmp_path / 'none.jpg'), 'does not exist'),
        (str(corrupt), 'the file is corrupt, truncated or not an image'),
    ):
        with pytest.raises(SystemExit) as e:
            demo.main(
                [img, osp.join(tools.root, tools.seg_cfg), str(seg_ckpt)]
            )
        assert str(e.value).startswith(f'error: image {img!r}') or (
            str(e.value).startswith(f'error: cannot read image {img!r}')
        )
        assert text in str(e.value)


def test_demo_refuses_bad_checkpoints(tools, demo, seg_ckpt, tmp_path):
    bad = tmp_path / 'truncated.pth'
    bad.write_bytes(seg_ckpt.read_bytes()[:1000])
    no_meta = tmp_path / 'no_meta.pth'
    state_dict = torch.load(seg_ckpt, weights_only=True)['state_dict']
    torch.save(dict(state_dict=state_dict), no_meta)
    cfg = osp.join(tools.root, tools.seg_cfg)
    for ckpt, text in (
        (bad, f'error: checkpoint {str(bad)!r} is truncated or corrupt'),
        (no_meta, f"error: checkpoint {str(no_meta)!r} has no 'meta'"),
    ):
        with pytest.raises(SystemExit) as e:
            demo.main([osp.join(tools.root, IMG), cfg, str(ckpt)])
        assert str(e.value).startswith(text), str(e.value)


def test_demo_warns_of_another_pruning_in_the_checkpoint(demo, monkeypatch):
    from mmssm.models.backbones import PlainMamba

    logged = []
    monkeypatch.setattr(
        demo, 'print_log', lambda msg, **kwargs: logged.append(msg)
    )
    arch = dict(
        embed_dims=32,
        num_layers=3,
        num_convs=1,
        dw_layers=[],
        d_state=4,
        expand=1,
        conv_size=3,
    )
    model = torch.nn.Sequential(PlainMamba(arch=arch))
    demo.report_pruning(model, {'pruning': {'0': None}})  # the same
    assert logged == ['token pruning: 0: dense']
    logged.clear()
    saved = pruning_meta(
        torch.nn.Sequential(
            PlainMamba(arch=arch, prune_cfg=dict(layers=[1], keep_ratios=0.5))
        )
    )
    demo.report_pruning(model, {'pruning': saved})
    assert logged[1].startswith(
        'the checkpoint was saved with another token pruning (0: PlainMamba '
        'pruned after layers [1] keeping [0.5]'
    )


# --------------------------------------------------------------------------
# Classification: converted releases in the ImageNet configs, the demo
# --------------------------------------------------------------------------
CLS_RELEASES = {
    # family -> (dense config, converter, its arguments)
    'plainmamba': (
        'configs/plainmamba/plainmamba-l1_8xb64_in1k.py',
        'tools/model_converters/plainmamba2mmssm.py',
    ),
    'vim': (
        'configs/vim/vim-t_8xb64_in1k.py',
        'tools/model_converters/vim2mmssm.py',
    ),
}


def _released_checkpoint(family: str, model) -> dict:
    """``model``'s weights in the released layout of its family: PlainMamba's
    mmcls 0.x file (``state_dict`` with the EMA hook's buffers), Vim's
    DeiT-style file (``model``: backbone keys without prefix, ``head.*``)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if family == 'plainmamba':
        for k in list(state)[:3]:
            state['ema_' + k.replace('.', '_')] = state[k].clone()
        return dict(meta=dict(epoch=300), state_dict=state)
    released = {
        k.replace('backbone.', '', 1).replace('head.fc.', 'head.', 1): v
        for k, v in state.items()
    }
    return dict(model=released, epoch=299)


@pytest.mark.parametrize('family', sorted(CLS_RELEASES))
def test_classification_demo_on_a_converted_release(
    family, tools, tmp_path, scope
):
    """A released ImageNet checkpoint (built here in its layout, random
    weights with a spread-out head) converted by its converter loads
    strictly into the dense ImageNet config, and the demo prints the top-5
    of a real photo through mmpretrain's inferencer, with ImageNet's class
    names: the classes and scores of the source model on the config's test
    pipeline."""
    from mmengine.dataset import Compose
    from mmpretrain.datasets import ImageNet

    from mmssm.models.classifiers import build_classifier

    config, converter = CLS_RELEASES[family]
    cfg = Config.fromfile(osp.join(tools.root, config))
    torch.manual_seed(0)
    source = build_classifier(cfg.model.backbone, 1000).eval()
    torch.nn.init.normal_(source.head.fc.weight, std=1.0)
    src = tmp_path / 'release.pth'
    torch.save(_released_checkpoint(family, source), src)
    dst = tmp_path / 'converted.pth'
    tools.load_script(converter).main([str(src), str(dst)])

    demo = tools.load_script('demo/image_classification_demo.py')
    with scope('mmssm'):
        top = demo.main([IMG, config, str(dst), '--device', 'cpu'])
        with scope('mmpretrain'):
            pipeline = Compose(cfg.test_dataloader.dataset.pipeline)
        data = pipeline(dict(img_path=osp.join(tools.root, IMG)))
    mean = torch.tensor(cfg.data_preprocessor.mean).view(3, 1, 1)
    std = torch.tensor(cfg.data_preprocessor.std).view(3, 1, 1)
    x = ((data['inputs'].flip(0).float() - mean) / std)[None]  # BGR -> RGB
    with torch.no_grad():
        scores, indices = source(x).softmax(-1)[0].topk(5)
    assert [i for _, i, _ in top] == indices.tolist()
    assert [s for s, _, _ in top] == pytest.approx(scores.tolist(), abs=1e-5)
    names = ImageNet.METAINFO['classes']
    assert [n for _, _, n in top] == [names[i] for i in indices.tolist()]


def test_classification_demo_refuses_bad_input(tools, tmp_path):
    """Another model's checkpoint, a detection config, a missing image: one
    line naming it."""
    demo = tools.load_script('demo/image_classification_demo.py')
    config = CLS_RELEASES['vim'][0]
    ckpt = tmp_path / 'other.pth'
    torch.save(dict(state_dict={'backbone.foo': torch.zeros(1)}), ckpt)
    with pytest.raises(SystemExit, match='other.pth'):
        demo.main([IMG, config, str(ckpt), '--device', 'cpu'])
    with pytest.raises(SystemExit, match='mmdet config'):
        demo.main([IMG, tools.mini_cfg, str(ckpt)])
    with pytest.raises(SystemExit, match='nowhere.jpg'):
        demo.main(['nowhere.jpg', config, str(ckpt)])
