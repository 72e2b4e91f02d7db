"""mmssm.Runner's resume: exact losses, no data loaded for skipped batches.

On the CPU, one process, ``num_workers=0``: a run resumed at iteration 2
logs the losses of the uninterrupted run at iterations 3 and 4 (random
states restored), and no batch before iteration 3 is loaded. The sampler
replay keeps the order of the batch indices with ``num_workers > 0``.
"""

import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import DefaultScope

from mmssm.datasets.synthetic_coco import make_synthetic_coco

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = osp.join(
    ROOT,
    'configs',
    'mask_rcnn',
    'mask-rcnn_plainmamba-l1-prune_adapter-fpn_1xb4-synthetic_coco-shapes.py',
)


class _Record(Hook):
    """The losses, the batches trained on and every sample loaded."""

    priority = 'HIGHEST'

    def __init__(self) -> None:
        self.losses = {}
        self.trained = []
        self.loaded = []

    def before_train(self, runner) -> None:
        dataset = runner.train_loop.dataloader.dataset
        prepare = dataset.prepare_data

        def counted(idx):
            self.loaded.append(idx)
            return prepare(idx)

        dataset.prepare_data = counted

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        ids = [s.img_id for s in data_batch['data_samples']]
        self.trained.append((runner.iter, ids))

    def after_train_iter(
        self, runner, batch_idx, data_batch=None, outputs=None
    ):
        self.losses[runner.iter] = outputs['loss'].item()


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('resume') / 'shapes')
    make_synthetic_coco(out, num_train=12, num_val=2, image_size=64, seed=5)
    return out


def _cfg(configs, data_root, work_dir, max_iters):
    cfg = configs.shrink_detector(Config.fromfile(CONFIG))
    cfg.work_dir = str(work_dir)
    for loader in (cfg.train_dataloader, cfg.val_dataloader):
        loader.dataset.data_root = data_root
    cfg.val_evaluator.ann_file = osp.join(
        data_root, 'annotations/instances_val.json'
    )
    cfg.test_evaluator = cfg.val_evaluator
    cfg.train_dataloader.batch_size = 2
    cfg.train_cfg.max_iters = max_iters
    cfg.train_cfg.val_interval = 2  # a validation right after the save
    cfg.default_hooks.checkpoint.interval = 2
    cfg.default_hooks.logger.interval = 1
    cfg.param_scheduler = []
    cfg.randomness = dict(seed=0)
    cfg.log_level = 'WARNING'
    return cfg


def _train(cfg, resume=None, **resume_hook):
    from mmssm.engine import Runner

    if resume is not None:
        cfg.resume, cfg.load_from = True, resume
    if resume_hook:
        cfg.default_hooks.resume = dict(type='mmssm.ResumeHook', **resume_hook)
    record = _Record()
    with DefaultScope.overwrite_default_scope('mmdet'):
        runner = Runner.from_cfg(cfg)
        runner.register_hook(record)
        runner.train()
    return record


def test_resume_is_exact_and_loads_no_trained_batch(shapes, configs, tmp_path):
    full = _train(_cfg(configs, shapes, tmp_path / 'full', 4))
    part = tmp_path / 'part'
    _train(_cfg(configs, shapes, part, 2))
    ckpt = str(part / 'iter_2.pth')
    checkpoint = torch.load(ckpt, map_location='cpu', weights_only=True)
    assert checkpoint['resume']['batches'] == 2
    assert set(checkpoint['resume']['random_states']) >= {
        'python',
        'numpy',
        'torch',
    }
    resumed = _train(_cfg(configs, shapes, part, 4), resume=ckpt)
    # iterations 3 and 4 train on the same batches, and only their
    # samples are loaded (2 x 2 images)
    assert resumed.trained == full.trained[2:]
    assert len(resumed.loaded) == 4
    assert sorted(resumed.losses) == [2, 3]
    for i in (2, 3):
        assert resumed.losses[i] == full.losses[i], i

    # the controls: mmengine's own resume loads the 2 x 2 trained samples
    # again, and without the random states the losses differ
    plain = _train(
        _cfg(configs, shapes, part, 4),
        resume=ckpt,
        restore_random_states=False,
        fast_skip=False,
    )
    assert plain.trained == full.trained[2:]
    assert len(plain.loaded) == 8
    assert plain.losses[2] != full.losses[2]


class _Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return i


@pytest.mark.parametrize('num_workers', [0, 2])
@pytest.mark.parametrize('infinite', [True, False])
def test_resumed_iterator_keeps_the_order(num_workers, infinite):
    """Batches after the skip are those of the uninterrupted run."""
    from mmengine.dataset import DefaultSampler, InfiniteSampler
    from mmengine.runner.loops import _InfiniteDataloaderIterator

    from mmssm.engine.hooks.resume_hook import ResumedDataloaderIterator

    def loader():
        kind = InfiniteSampler if infinite else DefaultSampler
        return torch.utils.data.DataLoader(
            _Numbers(),
            batch_size=3,
            sampler=kind(_Numbers(), shuffle=True, seed=1),
            num_workers=num_workers,
        )

    full = _InfiniteDataloaderIterator(loader())
    expected = [next(full).tolist() for _ in range(9)]  # 2 and a bit epochs
    resumed = ResumedDataloaderIterator(loader(), 5)
    assert [next(resumed) for _ in range(5)] == [None] * 5
    assert [next(resumed).tolist() for _ in range(4)] == expected[5:]
