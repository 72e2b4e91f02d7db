"""mmssm.Runner: one live training per work dir, a log folder per run."""

import subprocess
import sys

import pytest
import torch
from mmengine.model import BaseModel
from mmengine.registry import DefaultScope

from mmssm.errors import UserError
from mmssm.utils.fileio import LockHeld, hold_lock


class _Model(BaseModel):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, inputs, mode='tensor'):
        return dict(loss=self.linear(inputs).square().mean())


def _runner(work_dir):
    from mmssm.engine import Runner

    return Runner(
        model=_Model(),
        work_dir=str(work_dir),
        train_dataloader=dict(
            dataset=[dict(inputs=torch.ones(2))] * 4,
            sampler=dict(type='DefaultSampler', shuffle=False),
            batch_size=2,
            collate_fn=dict(type='default_collate'),
        ),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=True, max_epochs=1),
        log_level='WARNING',
    )


def _holder(path):
    """A process that holds the lock of ``path`` until killed."""
    code = (
        'import sys, time\n'
        'from mmssm.utils.fileio import hold_lock\n'
        "with hold_lock(sys.argv[1], 'process 1234: train.py x'):\n"
        "    print('held', flush=True)\n"
        '    time.sleep(120)\n'
    )
    proc = subprocess.Popen(
        [sys.executable, '-c', code, str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == 'held'
    return proc


def test_lock_of_a_dead_holder_is_free(tmp_path):
    lock = tmp_path / '.train.lock'
    proc = _holder(lock)
    try:
        with pytest.raises(LockHeld) as info:
            with hold_lock(lock, 'me'):
                pass
        assert info.value.holder == 'process 1234: train.py x'
    finally:
        proc.kill()  # as a crash: no clean-up of its own
        proc.wait()
    with hold_lock(lock, 'me'):
        assert lock.read_text() == 'me'


def test_second_training_on_a_work_dir_is_refused(tmp_path):
    proc = _holder(tmp_path / '.train.lock')
    try:
        with DefaultScope.overwrite_default_scope('mmengine'):
            runner = _runner(tmp_path)
            with pytest.raises(UserError) as info:
                runner.train()
        assert str(info.value) == (
            f'work dir {str(tmp_path)!r} is in use by a live training run '
            '(process 1234: train.py x); wait for it to end, or train into '
            'another --work-dir'
        )
        assert not list(tmp_path.glob('epoch_*.pth'))
    finally:
        proc.kill()
        proc.wait()
    with DefaultScope.overwrite_default_scope('mmengine'):
        _runner(tmp_path).train()  # the holder is gone
    assert (tmp_path / 'epoch_1.pth').is_file()


def test_runs_of_the_same_second_get_their_own_log_folder(tmp_path):
    """Three runners in a row: mmengine would name two of them alike."""
    with DefaultScope.overwrite_default_scope('mmengine'):
        runners = [_runner(tmp_path) for _ in range(3)]
    assert len({r.timestamp for r in runners}) == 3
    assert len({r.log_dir for r in runners}) == 3
