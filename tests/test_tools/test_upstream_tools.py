"""mmdet's and mmseg's own tools (the wheels' ``.mim/tools`` scripts) on
mmssm configs: the synthetic shapes Mask R-CNN and the mini ADE20K UperNet,
both shrunk to a tiny pruned backbone and trained for 2 iterations.

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

from .conftest import SEG_CFG, SEG_SHRINK, SHRINK, check_ok, run_tool


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
