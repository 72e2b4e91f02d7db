"""mmengine checkpoints: ``weights_only`` unpickling kept on, strict loads.

A checkpoint that does not hold exactly the weights of the model (tools/
test.py, demo/image_demo.py) is refused in one line that names the file,
the missing and unexpected keys and the shape mismatches.
"""

import os
import pickle

import numpy as np
import pytest
import torch
from mmengine.model import BaseModel
from mmengine.registry import DefaultScope
from mmengine.runner import Runner, load_checkpoint
from torch.utils.data import Dataset

import mmssm  # noqa: F401  (allow-lists mmengine's checkpoint types)
from mmssm.errors import UserError
from mmssm.utils.checkpoint import load_checkpoint_strict


class ToyModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, inputs, targets, mode='tensor'):
        out = self.linear(inputs)
        if mode == 'loss':
            return dict(loss=((out - targets) ** 2).mean())
        return out


class ToyDataset(Dataset):
    metainfo = dict(classes=('a', 'b'))

    def __len__(self):
        return 8

    def __getitem__(self, i):
        x = torch.tensor([float(i), 1.0])
        return dict(inputs=x, targets=x.sum(0, keepdim=True))


class _Net(torch.nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.fc = torch.nn.Linear(width, 2)
        self.bn = torch.nn.BatchNorm1d(2)


def test_load_checkpoint_strict(tmp_path):
    model = _Net()
    good = tmp_path / 'good.pth'
    torch.save(dict(state_dict=_Net().state_dict(), meta=dict()), good)
    load_checkpoint_strict(model, str(good))
    assert torch.equal(
        model.fc.weight, torch.load(good)['state_dict']['fc.weight']
    )
    # as mmengine's wrappers save it, and without the running-stat counter
    # (old checkpoints)
    state = {
        'module.' + k: v
        for k, v in model.state_dict().items()
        if 'num_batches_tracked' not in k
    }
    torch.save(state, tmp_path / 'module.pth')
    load_checkpoint_strict(model, str(tmp_path / 'module.pth'))

    with pytest.raises(UserError, match="'.*none.pth' does not exist"):
        load_checkpoint_strict(model, str(tmp_path / 'none.pth'))

    other = dict(model.state_dict())
    other['head.weight'] = other.pop('fc.weight')
    path = str(tmp_path / 'other.pth')
    torch.save(dict(state_dict=other), path)
    with pytest.raises(UserError) as info:
        load_checkpoint_strict(model, path)
    message = str(info.value)
    assert message.startswith(f'checkpoint {path!r} does not match')
    assert 'missing keys: fc.weight' in message
    assert 'unexpected keys: head.weight' in message
    assert '\n' not in message

    path = str(tmp_path / 'wide.pth')
    torch.save(dict(state_dict=_Net(width=8).state_dict()), path)
    with pytest.raises(UserError, match='size mismatch for fc.weight: '):
        load_checkpoint_strict(model, path)


def test_load_checkpoint_strict_lists_many_keys_briefly(tmp_path):
    model = torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(10)])
    path = tmp_path / 'empty.pth'
    torch.save(dict(state_dict={}), path)
    with pytest.raises(UserError) as info:
        load_checkpoint_strict(model, str(path))
    assert 'missing keys: 0.weight, 0.bias, ' in str(info.value)
    assert '... (20 in all)' in str(info.value)


def make_runner(work_dir, max_epochs, resume=False):
    return Runner(
        model=ToyModel(),
        work_dir=str(work_dir),
        train_dataloader=dict(
            dataset=ToyDataset(),
            sampler=dict(type='DefaultSampler'),
            batch_size=4,
            num_workers=0,
            collate_fn=dict(type='default_collate'),
        ),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1)),
        resume=resume,
        experiment_name=f'toy_{max_epochs}_{resume}',
    )


def test_default_load_is_weights_only():
    import inspect

    assert (
        inspect.signature(torch.load).parameters['weights_only'].default
        is None
    )  # None means True since torch 2.6
    assert torch.__version__ >= '2.6'


def test_training_checkpoint_loads_and_resumes(tmp_path):
    # a Runner sets its default scope ('mmengine'): for this test only
    with DefaultScope.overwrite_default_scope('mmengine'):
        runner = make_runner(tmp_path, max_epochs=2)
        runner.train()
        resumed = make_runner(tmp_path, max_epochs=3, resume=True)
        resumed.train()
    assert resumed.epoch == 3 and resumed.iter == 6
    assert (tmp_path / 'epoch_3.pth').exists()
    ckpt = tmp_path / 'epoch_2.pth'
    raw = torch.load(ckpt, weights_only=True)  # numpy and HistoryBuffer
    assert raw['meta']['epoch'] == 2
    assert 'message_hub' in raw and 'optimizer' in raw
    model = ToyModel()
    load_checkpoint(model, str(ckpt), strict=True)
    torch.testing.assert_close(model.linear.weight, runner.model.linear.weight)


def test_numpy_values_in_meta_load(tmp_path):
    path = tmp_path / 'ckpt.pth'
    meta = dict(seed=np.int64(3), lr=np.float32(0.5), arr=np.arange(3))
    torch.save(dict(state_dict=ToyModel().state_dict(), meta=meta), path)
    loaded = torch.load(path, weights_only=True)
    assert loaded['meta']['seed'] == 3
    np.testing.assert_array_equal(loaded['meta']['arr'], np.arange(3))


class _RunsCode:
    """A pickle payload that would run a shell command when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_malicious_checkpoint_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save(
        dict(state_dict=ToyModel().state_dict(), meta=_RunsCode(marker)), path
    )
    with pytest.raises(pickle.UnpicklingError, match='system'):
        load_checkpoint(ToyModel(), str(path))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)
    assert not marker.exists()


def test_getattr_is_served_for_history_buffer_methods_only(tmp_path):
    from mmengine.logging.history_buffer import HistoryBuffer

    path = tmp_path / 'getattr.pth'
    torch.save(dict(meta=_Getattr(HistoryBuffer, '__init__')), path)
    with pytest.raises(pickle.UnpicklingError, match='getattr'):
        torch.load(path)
    torch.save(dict(meta=_Getattr(HistoryBuffer, 'mean')), path)
    assert torch.load(path)['meta'] is HistoryBuffer.mean


class _Getattr:
    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def __reduce__(self):
        return getattr, (self.obj, self.name)
