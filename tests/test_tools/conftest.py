"""Shared settings of the tool tests: the mini COCO and ADE20K configs,
shrunk, and how to run the tools (also on 2 processes)."""

import importlib.util
import os
import os.path as osp
import socket
import subprocess
import sys
from types import SimpleNamespace
from typing import Dict, List

import pytest
import torch

from mmssm.testing import TINY_PRUNE

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
MINI_CFG = osp.join(
    'configs',
    'mask_rcnn',
    'mask-rcnn_plainmamba-l1-prune_adapter-fpn_1xb2-mini_coco-persons.py',
)
MINI_ANN = osp.join(
    ROOT, 'data', 'coco_persons_mini', 'annotations', 'test_coco.json'
)

SEG_CFG = osp.join(
    'configs',
    'upernet',
    'upernet_plainmamba-l1-prune_adapter_1xb2-mini_ade20k-256x256.py',
)

# The backbone of a CPU-sized run of the mini configs: a 4-layer PlainMamba
# of 64 channels, pruned after its 2nd layer (mmssm.testing.TINY_PRUNE
# stands for the paper's schedule, which a tiny arch has none of), in an
# adapter of two interactions. Keys are --cfg-options keys.
BB = 'model.backbone.backbone'
BACKBONE_SHRINK: Dict[str, object] = {
    f'{BB}.arch._delete_': True,
    f'{BB}.arch.embed_dims': 64,
    f'{BB}.arch.num_layers': 4,
    f'{BB}.arch.num_convs': 1,
    f'{BB}.arch.dw_layers': [0],
    f'{BB}.arch.d_state': 8,
    f'{BB}.arch.expand': 1,
    f'{BB}.arch.conv_size': 3,
    f'{BB}.prune_cfg._delete_': True,
    **{f'{BB}.prune_cfg.{k}': v for k, v in TINY_PRUNE.items()},
    'model.backbone.interaction_indexes': [[0, 1], [2, 3]],
    'model.backbone.deform_num_heads': 4,
    'model.backbone.conv_inplane': 16,
}
# The mini COCO config: that backbone, 32-channel heads, fewer proposals
# and smaller images.
SHRINK: Dict[str, object] = {
    **BACKBONE_SHRINK,
    'model.neck.in_channels': [64, 64, 64, 64],
    'model.neck.out_channels': 32,
    'model.rpn_head.in_channels': 32,
    'model.rpn_head.feat_channels': 32,
    'model.roi_head.bbox_roi_extractor.out_channels': 32,
    'model.roi_head.bbox_head.in_channels': 32,
    'model.roi_head.bbox_head.conv_out_channels': 32,
    'model.roi_head.bbox_head.fc_out_channels': 64,
    'model.roi_head.mask_roi_extractor.out_channels': 32,
    'model.roi_head.mask_head.in_channels': 32,
    'model.roi_head.mask_head.conv_out_channels': 32,
    'model.train_cfg.rpn_proposal.nms_pre': 200,
    'model.train_cfg.rpn_proposal.max_per_img': 100,
    'model.train_cfg.rcnn.sampler.num': 64,
    'model.test_cfg.rpn.nms_pre': 200,
    'model.test_cfg.rpn.max_per_img': 50,
    'model.test_cfg.rcnn.max_per_img': 20,
    # images resized to fit 192x192 (the Resize steps of the mini config)
    'train_dataloader.dataset.pipeline.2.scale': (192, 192),
    'val_dataloader.dataset.pipeline.1.scale': (192, 192),
    'test_dataloader.dataset.pipeline.1.scale': (192, 192),
}
# The mini ADE20K config: that backbone, 32-channel heads and 128x128 crops
# of images resized to a short side of 128 (the pipeline indices are those
# of the mini config).
SEG_SHRINK: Dict[str, object] = {
    **BACKBONE_SHRINK,
    'model.decode_head.in_channels': [64, 64, 64, 64],
    'model.decode_head.channels': 32,
    'model.auxiliary_head.in_channels': 64,
    'model.auxiliary_head.channels': 16,
    'model.data_preprocessor.size': (128, 128),
    'train_dataloader.dataset.pipeline.3.scale': (512, 128),
    'train_dataloader.dataset.pipeline.4.crop_size': (128, 128),
    'val_dataloader.dataset.pipeline.1.scale': (512, 128),
    'test_dataloader.dataset.pipeline.1.scale': (512, 128),
}
# ... trained for 2 iterations, then validated and saved
SEG_2_ITERS: Dict[str, object] = {
    **SEG_SHRINK,
    'train_cfg.max_iters': 2,
    'train_cfg.val_interval': 2,
    'default_hooks.checkpoint.interval': 2,
}


def _format(value) -> str:
    if isinstance(value, (list, tuple)):
        items = ','.join(_format(v) for v in value)
        if isinstance(value, tuple):
            return f'({items},)' if len(value) == 1 else f'({items})'
        return f'[{items}]'
    return str(value)


def cfg_options(options: Dict[str, object]) -> List[str]:
    """``--cfg-options`` arguments: ``key=value`` strings."""
    return ['--cfg-options'] + [
        f'{k}={_format(v)}' for k, v in options.items()
    ]


def run_tool(
    args: List[str], timeout: float = 600, env: Dict[str, str] = None
) -> subprocess.CompletedProcess:
    """Run ``args`` (a tool and its arguments) from the repository root.

    ``env`` is added to the environment; its ``PYTHONPATH`` entries come
    before the repository root.
    """
    env = dict(env or {})
    paths = [env.pop('PYTHONPATH', ''), ROOT, os.environ.get('PYTHONPATH')]
    # one thread per process: tiny models on a shared CPU run faster
    full_env = dict(os.environ, **{'OMP_NUM_THREADS': '1', **env})
    full_env['PYTHONPATH'] = os.pathsep.join(p for p in paths if p)
    if args[0].endswith('.py'):
        args = [sys.executable] + args
    return subprocess.run(
        args,
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def load_script(path: str):
    """The script ``path`` (relative to the repository root) as a module."""
    name = osp.splitext(osp.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, osp.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (
        f'exit code {result.returncode}\n--- stdout (tail)\n'
        f'{result.stdout[-4000:]}\n--- stderr (tail)\n{result.stderr[-6000:]}'
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_dist(args: List[str]) -> subprocess.CompletedProcess:
    """Run ``bash args`` (a tools/dist_*.sh script) on a free port."""
    env = dict(
        PYTHON=sys.executable, OMP_NUM_THREADS='1', PORT=str(_free_port())
    )
    return run_tool(['bash', *args], env=env)


def check_dist_log(log: str) -> None:
    """The log of a 2-process run: distributed, gloo without CUDA."""
    assert 'Distributed training: True' in log
    assert 'GPU number: 2' in log  # mmengine's name for the world size
    if not torch.cuda.is_available():
        assert 'no CUDA: distributed backend gloo' in log


def load_dist_checkpoint(path) -> dict:
    """A checkpoint of a distributed run: no ``module.`` of the wrapper."""
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    assert not any(k.startswith('module.') for k in checkpoint['state_dict'])
    return checkpoint


@pytest.fixture(scope='session')
def tools():
    """The helpers above, for the tests of this folder."""
    return SimpleNamespace(
        root=ROOT,
        mini_cfg=MINI_CFG,
        mini_ann=MINI_ANN,
        backbone_shrink=dict(BACKBONE_SHRINK),
        shrink=dict(SHRINK),
        seg_cfg=SEG_CFG,
        seg_shrink=dict(SEG_SHRINK),
        seg_2_iters=dict(SEG_2_ITERS),
        cfg_options=cfg_options,
        run=run_tool,
        load_script=load_script,
        check_ok=check_ok,
    )


@pytest.fixture
def dist():
    """Helpers of the 2-process runs; skips without gloo."""
    if (
        not torch.distributed.is_available()
        or not torch.distributed.is_gloo_available()
    ):
        pytest.skip('torch.distributed with gloo is needed')
    return SimpleNamespace(
        run=run_dist,
        check_log=check_dist_log,
        load_checkpoint=load_dist_checkpoint,
    )


@pytest.fixture(scope='session')
def trained(tmp_path_factory):
    """tools/train.py on the mini config: 1 epoch (2 iterations)."""
    work_dir = tmp_path_factory.mktemp('mini_train')
    result = run_tool(
        [
            'tools/train.py',
            MINI_CFG,
            '--work-dir',
            str(work_dir),
            *cfg_options(
                {
                    **SHRINK,
                    'train_cfg.max_epochs': 1,
                    'train_cfg.val_interval': 10,
                }
            ),
        ]
    )
    check_ok(result)
    return work_dir, result
