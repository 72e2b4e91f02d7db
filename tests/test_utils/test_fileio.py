"""Files written whole or not at all: mmssm.utils.fileio and the
mmssm.CheckpointHook that saves checkpoints through it."""

import errno
import os
import stat

import pytest
import torch
from mmengine.fileio import dump, load
from mmengine.model import BaseModel
from mmengine.registry import DefaultScope
from torch.utils.data import Dataset

from mmssm.engine.hooks import CheckpointSaveError
from mmssm.utils import fileio
from mmssm.utils.fileio import (
    ATOMIC_BACKEND_ARGS,
    atomic_copy,
    atomic_open,
    atomic_write,
)


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_and_copy(tmp_path):
    path = tmp_path / 'a.txt'
    atomic_write(path, 'one')
    assert path.read_text() == 'one'
    atomic_write(path, b'two')  # replaces
    assert path.read_bytes() == b'two'
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    atomic_copy(path, tmp_path / 'b.txt')
    assert (tmp_path / 'b.txt').read_bytes() == b'two'
    assert _names(tmp_path) == ['a.txt', 'b.txt']  # no temporary left


def test_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / 'a.txt'
    path.write_text('complete')
    with pytest.raises(OSError, match='No space'):
        with atomic_open(path, 'w') as f:
            f.write('half of the new')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert path.read_text() == 'complete'
    assert _names(tmp_path) == ['a.txt']


def test_mmengine_dump_through_the_backend(tmp_path):
    path = str(tmp_path / 'results.pkl')
    dump([dict(a=1)], path, backend_args=ATOMIC_BACKEND_ARGS)
    assert load(path) == [dict(a=1)]
    assert _names(tmp_path) == ['results.pkl']


class _Model(BaseModel):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, inputs, targets, mode='tensor'):
        out = self.linear(inputs)
        return dict(loss=((out - targets) ** 2).mean())


class _Data(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        x = torch.tensor([float(i), 1.0])
        return dict(inputs=x, targets=x.sum(0, keepdim=True))


def _runner(work_dir, max_keep_ckpts=-1):
    from mmssm.engine import Runner

    return Runner(
        model=_Model(),
        work_dir=str(work_dir),
        train_dataloader=dict(
            dataset=_Data(),
            sampler=dict(type='DefaultSampler', shuffle=False),
            batch_size=2,
            collate_fn=dict(type='default_collate'),
        ),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=True, max_epochs=3),
        default_hooks=dict(
            checkpoint=dict(
                type='CheckpointHook',  # mmssm.Runner makes it ours
                interval=1,
                max_keep_ckpts=max_keep_ckpts,
            )
        ),
        log_level='WARNING',
    )


@pytest.mark.parametrize('max_keep_ckpts', [-1, 1])
def test_failed_save_is_one_line_and_leaves_no_partial_file(
    tmp_path, monkeypatch, max_keep_ckpts
):
    """The 3rd save fails half-way (no space): epoch_2 stays complete."""
    put = fileio.AtomicLocalBackend.put

    def full_disk(self, obj, filepath):
        if str(filepath).endswith('epoch_3.pth'):
            with atomic_open(filepath) as f:
                f.write(obj[: len(obj) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        put(self, obj, filepath)

    monkeypatch.setattr(fileio.AtomicLocalBackend, 'put', full_disk)
    with DefaultScope.overwrite_default_scope('mmengine'):
        runner = _runner(tmp_path, max_keep_ckpts)
        hook = [
            h for h in runner.hooks if type(h).__name__ == 'CheckpointHook'
        ]
        assert type(hook[0]).__module__ == 'mmssm.engine.hooks.checkpoint_hook'
        with pytest.raises(CheckpointSaveError) as info:
            runner.train()
    last = str(tmp_path / 'epoch_2.pth')
    assert str(info.value) == (
        f'cannot save checkpoint {str(tmp_path / "epoch_3.pth")!r}: no '
        f'space left on device; the last complete checkpoint is {last!r} '
        '(free space, then train again with --resume)'
    )
    assert (tmp_path / 'last_checkpoint').read_text() == last
    ckpts = sorted(p for p in _names(tmp_path) if p.endswith('.pth'))
    expected = ['epoch_2.pth'] if max_keep_ckpts == 1 else None
    assert ckpts == (expected or ['epoch_1.pth', 'epoch_2.pth'])
    assert not [p for p in _names(tmp_path) if p.endswith('.tmp')]
    assert torch.load(last, weights_only=True)['meta']['epoch'] == 2
