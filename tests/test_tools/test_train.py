"""tools/train.py on the mini COCO set: checkpoints and --resume."""

import os.path as osp
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

import mmssm  # noqa: F401  (allow-lists mmengine checkpoint types)


def test_train_writes_a_checkpoint(trained, tools):
    work_dir, result = trained
    log = result.stdout + result.stderr
    assert 'Epoch(train) [1][2/2]' in log  # 4 images, 2 per iteration
    assert 'no CUDA' not in log  # one process: no distributed set-up
    ckpt = work_dir / 'epoch_1.pth'
    assert ckpt.is_file()
    assert (work_dir / 'last_checkpoint').read_text().strip() == str(ckpt)
    # mmengine's checkpoint loads with weights_only=True (torch's default)
    checkpoint = torch.load(ckpt, map_location='cpu', weights_only=True)
    assert checkpoint['meta']['epoch'] == 1
    assert checkpoint['meta']['iter'] == 2
    keys = checkpoint['state_dict'].keys()
    assert any(k.startswith('backbone.backbone.layers.3.mamba.') for k in keys)
    assert any(k.startswith('backbone.spm.') for k in keys)
    assert any(k.startswith('roi_head.mask_head.') for k in keys)
    # the config is saved next to the checkpoints
    assert (work_dir / osp.basename(tools.mini_cfg)).is_file()


def test_resume_continues_from_the_last_checkpoint(trained, tools, tmp_path):
    """An interrupted 2-epoch run, resumed with --resume (auto)."""
    first, _ = trained
    work_dir = tmp_path / 'work'
    shutil.copytree(first, work_dir)  # the run that stopped after epoch 1
    (work_dir / 'last_checkpoint').write_text(str(work_dir / 'epoch_1.pth'))
    probe = tmp_path / 'probe.pth'
    cfg = tmp_path / 'mini_resume.py'
    cfg.write_text(
        f'_base_ = {osp.join(tools.root, tools.mini_cfg)!r}\n'
        "custom_imports = dict(imports=['mmssm.models', 'mmssm.engine', "
        "'resume_probe'], allow_failed_imports=False)\n"
        "custom_hooks = [dict(type='ResumeProbeHook', "
        f'out_file={str(probe)!r})]\n'
    )
    result = tools.run(
        [
            'tools/train.py',
            str(cfg),
            '--work-dir',
            str(work_dir),
            '--resume',
            *tools.cfg_options(
                {
                    **tools.shrink,
                    'train_cfg.max_epochs': 2,
                    'train_cfg.val_interval': 10,
                }
            ),
        ],
        env=dict(PYTHONPATH=osp.dirname(osp.abspath(__file__))),
    )
    tools.check_ok(result)
    log = result.stdout + result.stderr
    assert 'resumed epoch: 1, iter: 2' in log
    assert 'Epoch(train) [1]' not in log  # epoch 1 is not trained again
    assert 'Epoch(train) [2][2/2]' in log

    saved = torch.load(
        work_dir / 'epoch_1.pth', map_location='cpu', weights_only=True
    )
    start = torch.load(probe, map_location='cpu', weights_only=True)
    assert (start['iter'], start['epoch']) == (2, 1)
    assert start['state_dict'].keys() == saved['state_dict'].keys()
    for key, value in saved['state_dict'].items():
        assert torch.equal(start['state_dict'][key], value), key
    # the optimizer state is resumed too (AdamW's step count and moments)
    saved_state = saved['optimizer']['state']
    start_state = start['optimizer']['state']
    assert saved_state.keys() == start_state.keys() and saved_state
    for index, state in saved_state.items():
        for name, value in state.items():
            assert torch.equal(start_state[index][name], value), (index, name)

    final = torch.load(
        work_dir / 'epoch_2.pth', map_location='cpu', weights_only=True
    )
    assert (final['meta']['epoch'], final['meta']['iter']) == (2, 4)
    assert (work_dir / 'last_checkpoint').read_text().strip() == str(
        work_dir / 'epoch_2.pth'
    )


def _can_mount_tmpfs() -> bool:
    if shutil.which('unshare') is None:
        return False
    cmd = ['unshare', '-rm', 'sh', '-c', 'mount -t tmpfs none /mnt']
    return subprocess.run(cmd, capture_output=True).returncode == 0


@pytest.mark.skipif(
    not _can_mount_tmpfs(), reason='needs unshare -rm and a tmpfs mount'
)
def test_full_disk(trained, tools, tmp_path):
    """Training on a disk that holds one checkpoint and a half.

    The work dir is a tmpfs of its own (a mount namespace of the run, so
    nothing is left mounted): the 2nd save fails for lack of space.
    """
    size = (trained[0] / 'epoch_1.pth').stat().st_size
    disk = tmp_path / 'disk'
    disk.mkdir()
    args = [
        sys.executable,
        'tools/train.py',
        tools.mini_cfg,
        '--work-dir',
        str(disk),
        *tools.cfg_options(
            {
                **tools.shrink,
                'train_cfg.max_epochs': 2,
                'train_cfg.val_interval': 10,
            }
        ),
    ]
    kb = size * 3 // 2 // 1024 + 64  # + the log and the config
    script = (
        f'mount -t tmpfs -o size={kb}k none {disk} && '
        f'{shlex.join(args)}; status=$?; ls -a {disk}; exit $status'
    )
    result = tools.run(['unshare', '-rm', 'sh', '-c', script])
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    complete = str(disk / 'epoch_1.pth')
    assert last == (
        f"error: cannot save checkpoint '{disk}/epoch_2.pth': no space left "
        f'on device; the last complete checkpoint is {complete!r} (free '
        'space, then train again with --resume)'
    ), result.stderr[-3000:]
    assert 'Traceback' not in result.stderr
    files = result.stdout.split()  # ls of the disk before it went away
    assert 'epoch_1.pth' in files and 'epoch_2.pth' not in files
    assert not [f for f in files if f.endswith('.tmp')]
