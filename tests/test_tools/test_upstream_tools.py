"""mmdet's, mmseg's and mmpretrain's own tools (the wheels' ``.mim/tools``
scripts) on mmssm configs: the synthetic shapes Mask R-CNN, the mini ADE20K
UperNet and the synthetic classification config, shrunk to a tiny pruned
backbone and trained for 2 iterations. mmpretrain's tools run in this
process (each as ``__main__``, in its own default scope): a process per tool
would spend most of its time importing.

Tools broken upstream for every model are run too and must fail the known
way, so that a fixed release shows up here (README, "The toolboxes' own
tools").
"""

import glob
import importlib.util
import os.path as osp
import pickle

import pytest
import torch
from mmengine.config import Config

from mmssm.datasets.synthetic_coco import make_synthetic_coco

from .conftest import ROOT, SEG_CFG, SEG_SHRINK, SHRINK, check_ok, run_tool


def _wheel_tools(package: str) -> str:
    spec = importlib.util.find_spec(package)
    return osp.join(osp.dirname(spec.origin), '.mim', 'tools')


DET_TOOLS = _wheel_tools('mmdet')
SEG_TOOLS = _wheel_tools('mmseg')
DET_CFG = osp.join(
    'configs',
    'mask_rcnn',
    'mask-rcnn_plainmamba-l1-prune_adapter-fpn_1xb4-synthetic_coco-shapes.py',
)
# 2 iterations, validated and saved at the end, every iteration logged
# (analyze_logs needs train entries)
TWO_ITERS = {
    'train_cfg.max_iters': 2,
    'train_cfg.val_interval': 2,
    'default_hooks.checkpoint.interval': 2,
    'default_hooks.logger.interval': 1,
    'log_processor.window_size': 1,
}


def _tool(root: str, name: str) -> str:
    sub = '' if name in ('train.py', 'test.py') else 'analysis_tools'
    return osp.join(root, sub, name)


def _dump(path: str, options: dict, out: str) -> str:
    """``path`` with ``options`` merged, as a config file the tools load
    (some take no --cfg-options)."""
    cfg = Config.fromfile(path)
    cfg.merge_from_dict(options)
    cfg.dump(out)
    return out


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Both configs, shrunk, each trained for 2 iterations by its
    toolbox's train.py; the work dirs and checkpoints."""
    tmp = tmp_path_factory.mktemp('upstream')
    data = str(tmp / 'shapes') + '/'
    make_synthetic_coco(data, num_train=4, num_val=2, image_size=64, seed=0)
    det_options = {
        k: v for k, v in SHRINK.items() if '.pipeline.' not in k
    }  # the mini COCO config's pipeline indices are not this config's
    for split in ('train', 'val', 'test'):
        det_options[f'{split}_dataloader.dataset.data_root'] = data
    for split in ('val', 'test'):
        det_options[f'{split}_evaluator.ann_file'] = (
            data + 'annotations/instances_val.json'
        )
    det_options['train_dataloader.batch_size'] = 2
    det_cfg = _dump(
        DET_CFG, {**det_options, **TWO_ITERS}, str(tmp / 'det_cfg.py')
    )
    seg_cfg = _dump(
        SEG_CFG, {**SEG_SHRINK, **TWO_ITERS}, str(tmp / 'seg_cfg.py')
    )
    out = {}
    for kind, cfg, tools in (
        ('det', det_cfg, DET_TOOLS),
        ('seg', seg_cfg, SEG_TOOLS),
    ):
        work_dir = str(tmp / f'{kind}_work')
        check_ok(
            run_tool([_tool(tools, 'train.py'), cfg, '--work-dir', work_dir])
        )
        (json_log,) = glob.glob(osp.join(work_dir, '*', 'vis_data', '2*.json'))
        out[kind] = dict(
            cfg=cfg,
            work_dir=work_dir,
            ckpt=osp.join(work_dir, 'iter_2.pth'),
            json_log=json_log,
        )
    out['tmp'] = tmp
    return out


@pytest.fixture(scope='module')
def det_results(runs):
    """mmdet test.py --out: the pickled predictions."""
    det = runs['det']
    pkl = str(runs['tmp'] / 'det_results.pkl')
    result = run_tool(
        [
            _tool(DET_TOOLS, 'test.py'),
            det['cfg'],
            det['ckpt'],
            '--out',
            pkl,
            '--work-dir',
            det['work_dir'],
        ]
    )
    check_ok(result)
    assert 'coco/bbox_mAP' in result.stdout + result.stderr
    return pkl


def test_det_eval_metric(runs, det_results):
    result = run_tool(
        [_tool(DET_TOOLS, 'eval_metric.py'), runs['det']['cfg'], det_results]
    )
    check_ok(result)
    assert 'coco/segm_mAP' in result.stdout


def test_det_confusion_matrix(runs, det_results, tmp_path):
    result = run_tool(
        [
            _tool(DET_TOOLS, 'confusion_matrix.py'),
            runs['det']['cfg'],
            det_results,
            str(tmp_path),
        ]
    )
    check_ok(result)
    assert osp.getsize(tmp_path / 'confusion_matrix.png') > 0


def test_det_analyze_results(runs, det_results, tmp_path):
    result = run_tool(
        [
            _tool(DET_TOOLS, 'analyze_results.py'),
            runs['det']['cfg'],
            det_results,
            str(tmp_path),
            '--topk',
            '1',
        ]
    )
    check_ok(result)
    for folder in ('good', 'bad'):
        assert glob.glob(str(tmp_path / folder / '*.png'))


@pytest.mark.parametrize('kind', ['det', 'seg'])
def test_browse_dataset(runs, kind, tmp_path):
    tools = DET_TOOLS if kind == 'det' else SEG_TOOLS
    result = run_tool(
        [
            _tool(tools, 'browse_dataset.py'),
            runs[kind]['cfg'],
            '--not-show',
            '--output-dir',
            str(tmp_path),
        ]
    )
    if kind == 'seg':
        # upstream: mmseg's label boxes (cv2.rectangle) on a non-contiguous
        # copy of the image, with OpenCV 4 and 5 alike
        # (open-mmlab/mmsegmentation#3405); README names the replacement
        assert result.returncode != 0
        assert "in function 'rectangle'" in result.stderr
        return
    check_ok(result)
    assert glob.glob(str(tmp_path / '*.png'))


@pytest.mark.parametrize('kind', ['det', 'seg'])
def test_analyze_logs(runs, kind, tmp_path):
    tools = DET_TOOLS if kind == 'det' else SEG_TOOLS
    png = tmp_path / 'loss.png'
    args = ['plot_curve'] if kind == 'det' else []
    result = run_tool(
        [
            _tool(tools, 'analyze_logs.py'),
            *args,
            runs[kind]['json_log'],
            '--keys',
            'loss',
            '--out',
            str(png),
        ]
    )
    check_ok(result)
    assert png.stat().st_size > 0


@pytest.mark.parametrize(
    'task',
    [
        'dataloader',
        pytest.param(
            'inference',
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(),
                reason="mmdet's inference benchmark moves the model to CUDA",
            ),
        ),
    ],
)
def test_det_benchmark(runs, task):
    det = runs['det']
    result = run_tool(
        [
            _tool(DET_TOOLS, 'benchmark.py'),
            det['cfg'],
            '--checkpoint',
            det['ckpt'],
            '--max-iter',
            '2',
            '--num-warmup',
            '1',
            '--log-interval',
            '1',
            '--task',
            task,
        ]
    )
    check_ok(result)  # psutil: mmdet's benchmark reads the memory with it
    assert 'Overall fps' in result.stdout + result.stderr


def test_det_get_flops(runs):
    """mmdet's counter traces the pruned model (tensor token counts)."""
    result = run_tool(
        [
            _tool(DET_TOOLS, 'get_flops.py'),
            runs['det']['cfg'],
            '--num-images',
            '1',
        ]
    )
    check_ok(result)
    assert 'Flops:' in result.stdout and 'Params:' in result.stdout


def test_seg_test_and_confusion_matrix(runs, tmp_path):
    seg = runs['seg']
    out = tmp_path / 'pred'
    result = run_tool(
        [
            _tool(SEG_TOOLS, 'test.py'),
            seg['cfg'],
            seg['ckpt'],
            '--out',
            str(out),
            '--work-dir',
            seg['work_dir'],
        ]
    )
    check_ok(result)
    assert 'mIoU' in result.stdout + result.stderr
    assert glob.glob(str(out / '*.png'))
    result = run_tool(
        [
            _tool(SEG_TOOLS, 'confusion_matrix.py'),
            seg['cfg'],
            str(out),
            str(tmp_path),
        ]
    )
    # upstream: the figure is 2 inches per class, 300 x 240 inches for
    # ADE20K's 150 classes (about 3 GB at 100 dpi); README
    if result.returncode != 0:
        assert 'MemoryError' in result.stderr or 'bad_alloc' in result.stderr
    else:
        assert osp.getsize(tmp_path / 'confusion_matrix.png') > 0


def test_seg_benchmark(runs):
    seg = runs['seg']
    result = run_tool(
        [
            _tool(SEG_TOOLS, 'benchmark.py'),
            seg['cfg'],
            seg['ckpt'],
            '--repeat-times',
            '1',
            '--work-dir',
            seg['work_dir'],
        ]
    )
    check_ok(result)
    assert 'fps' in (result.stdout + result.stderr).lower()


def test_seg_get_flops_broken_upstream(runs):
    """mmseg 1.2's get_flops passes both ``input_shape`` and ``inputs`` to
    mmengine 0.10's counter, for every model; ours replaces it (README)."""
    result = run_tool([_tool(SEG_TOOLS, 'get_flops.py'), runs['seg']['cfg']])
    assert result.returncode != 0
    assert 'input_shape' in result.stderr


def test_pickle_is_det_results(det_results):
    with open(det_results, 'rb') as f:
        results = pickle.load(f)
    assert len(results) == 2 and 'pred_instances' in results[0]


@pytest.mark.parametrize('family', ['plainmamba', 'vim'])
def test_pruned_backbone_traces(family):
    """mmengine's counters run the model under torch.jit.trace, where
    token counts are tensors: the pruned path traces to the eager output."""
    import warnings

    import mmssm.models  # noqa: F401
    from mmssm.registry import MODELS
    from mmssm.testing.models import TINY_PRUNE, tiny_backbone_cfg

    torch.manual_seed(0)
    cfg = tiny_backbone_cfg(family, prune_cfg=dict(TINY_PRUNE))
    model = MODELS.build(cfg).eval()
    x = torch.randn(1, 3, 64, 80)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # TracerWarnings of the int sizes
        traced = torch.jit.trace(model, x, check_trace=False)
    for a, b in zip(model(x), traced(x)):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------
# mmpretrain's tools on the synthetic classification config
# --------------------------------------------------------------------------
CLS_TOOLS = _wheel_tools('mmpretrain')
CLS_CFG = osp.join(
    'configs',
    'plainmamba',
    'plainmamba-l1-prune_1xb16-10e_synthetic-cls-128.py',
)


def _run_cls_tool(name: str, *args: str) -> str:
    """mmpretrain's tool ``name`` (a path under its tools/) run as
    ``__main__`` in this process; its standard output. Its default scope
    (the tools set mmpretrain's for good) is undone afterwards."""
    import contextlib
    import io
    import runpy
    import sys

    from mmengine.registry import DefaultScope

    out = io.StringIO()
    argv = sys.argv
    sys.argv = [name, *args]
    try:
        with (
            DefaultScope.overwrite_default_scope('mmssm'),
            contextlib.redirect_stdout(out),
        ):
            runpy.run_path(osp.join(CLS_TOOLS, name), run_name='__main__')
    finally:
        sys.argv = argv
    return out.getvalue()


@pytest.fixture(scope='module')
def cls_run(tmp_path_factory, monkeypatch_module):
    """The synthetic classification config with a tiny pruned PlainMamba
    (16 training images, batch 16: an iteration per epoch), trained for 2
    epochs by mmpretrain's train.py, then tested by its test.py --out."""
    from mmssm.datasets import write_synthetic_cls
    from mmssm.testing import TINY_PRUNE, tiny_arch

    monkeypatch_module.chdir(ROOT)  # the tools take relative paths
    tmp = tmp_path_factory.mktemp('upstream_cls')
    data = str(tmp / 'set') + '/'
    write_synthetic_cls(data, 16, 8, image_size=64, seed=1)
    arch = tiny_arch('plainmamba')
    options = {
        'model.backbone': dict(
            _delete_=True,
            type='mmssm.PlainMamba',
            arch=arch,
            img_size=64,
            out_type='avg_featmap',
            prune_cfg=dict(TINY_PRUNE),
        ),
        'model.head.in_channels': arch['embed_dims'],
        'train_cfg.max_epochs': 2,
        'default_hooks.logger.interval': 1,
        'log_processor.window_size': 1,
        **{
            f'{split}_dataloader.dataset.data_root': data
            for split in ('train', 'val', 'test')
        },
    }
    cfg = _dump(CLS_CFG, options, str(tmp / 'cls_cfg.py'))
    work_dir = str(tmp / 'work')
    _run_cls_tool('train.py', cfg, '--work-dir', work_dir)
    ckpt = osp.join(work_dir, 'epoch_2.pth')
    pkl = str(tmp / 'results.pkl')
    _run_cls_tool('test.py', cfg, ckpt, '--out', pkl, '--work-dir', work_dir)
    (json_log,) = glob.glob(osp.join(work_dir, '*', 'vis_data', '2*.json'))
    return dict(cfg=cfg, ckpt=ckpt, pkl=pkl, json_log=json_log, tmp=tmp)


@pytest.fixture(scope='module')
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_cls_train_and_test(cls_run):
    """train.py saved each epoch; test.py --out pickled one prediction per
    validation image."""
    assert osp.isfile(cls_run['ckpt'])
    with open(cls_run['pkl'], 'rb') as f:
        results = pickle.load(f)
    assert len(results) == 8 and 'pred_score' in results[0]
    ckpt = torch.load(cls_run['ckpt'], weights_only=True)
    assert ckpt['meta']['pruning']['backbone']['layers'] == [2]


def test_cls_analysis_tools(cls_run, tmp_path):
    """eval_metric, analyze_results, confusion_matrix, get_flops,
    print_config, verify_dataset, analyze_logs and vis_scheduler on the
    trained model, its predictions and its log."""
    cfg, pkl = cls_run['cfg'], cls_run['pkl']
    out = _run_cls_tool(
        'analysis_tools/eval_metric.py', pkl, '--metric', 'type=Accuracy'
    )
    assert 'accuracy/top1' in out
    _run_cls_tool(
        'analysis_tools/analyze_results.py',
        cfg,
        pkl,
        '--out-dir',
        str(tmp_path / 'analysis'),
        '--topk',
        '2',
    )
    for folder in ('success', 'fail'):
        assert (tmp_path / 'analysis' / folder / f'{folder}.json').is_file()
    matrix = tmp_path / 'confusion_matrix.png'
    _run_cls_tool(
        'analysis_tools/confusion_matrix.py',
        cfg,
        pkl,
        '--show-path',
        str(matrix),
    )
    assert matrix.stat().st_size > 0
    out = _run_cls_tool('analysis_tools/get_flops.py', cfg, '--shape', '64')
    assert 'Flops:' in out and 'Params:' in out
    out = _run_cls_tool('misc/print_config.py', cfg)
    assert "type='mmssm.PlainMamba'" in out
    out = _run_cls_tool('misc/verify_dataset.py', cfg)
    assert 'no broken file' in out
    curve = tmp_path / 'loss.png'
    _run_cls_tool(
        'analysis_tools/analyze_logs.py',
        'plot_curve',
        cls_run['json_log'],
        '--keys',
        'loss',
        '--out',
        str(curve),
    )
    assert curve.stat().st_size > 0
    schedule = tmp_path / 'lr.png'
    _run_cls_tool(
        'visualization/vis_scheduler.py',
        cfg,
        '--dataset-size',
        '16',
        '--save-path',
        str(schedule),
        '--not-show',
    )
    assert schedule.stat().st_size > 0


def test_cls_browse_dataset_broken_upstream(cls_run, tmp_path):
    """mmpretrain 1.2's browse_dataset passes the config's visualizer dict
    to the visualizer class, ``_scope_`` key included, which every config
    inheriting an ``mmpretrain::`` runtime base has; README names the
    replacements."""
    with pytest.raises(TypeError, match='_scope_'):
        _run_cls_tool(
            'visualization/browse_dataset.py',
            cls_run['cfg'],
            '-o',
            str(tmp_path),
            '-n',
            '2',
            '--not-show',
        )
