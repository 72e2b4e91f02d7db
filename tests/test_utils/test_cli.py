"""The plumbing of the tools: mmssm.utils.cli and mmssm.utils.distributed.

The rule the tools follow: a user error (mmssm.errors.UserError) ends a
tool with one line, ``error: <message>``, and exit status 1; any other
exception keeps its traceback.
"""

import argparse
import socket

import pytest
import torch
import torch.distributed as torch_dist
from mmengine.config import Config

from mmssm.errors import UserError
from mmssm.utils import cli
from mmssm.utils.distributed import (
    CPUDistributedDataParallel,
    end_distributed,
    setup_cpu_distributed,
)


def test_exit_on_user_error():
    @cli.exit_on_user_error
    def main(fail):
        """The tool."""
        if fail == 'user':
            raise UserError("file 'x.py' does not exist")
        if fail == 'bug':
            raise ValueError('a bug')
        return 'done'

    assert main(None) == 'done'
    assert main.__doc__ == 'The tool.'
    with pytest.raises(SystemExit) as e:
        main('user')
    assert str(e.value) == "error: file 'x.py' does not exist"
    with pytest.raises(ValueError, match='a bug'):  # not a user error
        main('bug')


def _args(tmp_path, *argv):
    config = tmp_path / 'my_config.py'
    config.write_text("default_scope = 'mmdet'\nwork_dir = None\nx = 1\n")
    parser = cli.runner_parser('a tool')
    return parser.parse_args([str(config), *argv])


def test_load_config(tmp_path):
    cfg = cli.load_config(_args(tmp_path, '--cfg-options', 'x=2'))
    assert cfg.x == 2 and cfg.launcher == 'none'
    assert cfg.work_dir == './work_dirs/my_config'
    cfg = cli.load_config(
        _args(tmp_path, '--cfg-options', 'work_dir=w', '--launcher', 'slurm')
    )
    assert cfg.work_dir == 'w' and cfg.launcher == 'slurm'
    cfg = cli.load_config(
        _args(tmp_path, '--work-dir', 'v', '--cfg-options', 'work_dir=w')
    )
    assert cfg.work_dir == 'v'  # command line > config
    missing = argparse.Namespace(**vars(_args(tmp_path)))
    missing.config = str(tmp_path / 'none.py')
    with pytest.raises(UserError, match="config file '.*none.py' does not"):
        cli.load_config(missing)


def test_build_runner_names_the_config_of_a_user_error(monkeypatch):
    def refuse(cfg):
        raise UserError("arch 'l9' is not one of ['l1']")

    monkeypatch.setattr(cli.Runner, 'from_cfg', refuse)
    with pytest.raises(
        UserError,
        match=r"^the config 'c\.py' does not build: arch 'l9' is not one of",
    ):
        cli.build_runner(Config(dict()), 'c.py')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_end_distributed_leaves_the_process_group(tmp_path):
    torch_dist.init_process_group(
        'gloo',
        init_method=f'file://{tmp_path / "store"}',
        rank=0,
        world_size=1,
    )
    try:
        end_distributed()
        assert not torch_dist.is_initialized()
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    end_distributed()  # not distributed: nothing to do


def test_cpu_distributed_setup():
    cfg = Config(dict(env_cfg=dict(dist_cfg=dict(backend='nccl'))))
    assert setup_cpu_distributed(cfg, 'none') is None
    assert cfg.env_cfg.dist_cfg.backend == 'nccl'
    if torch.cuda.is_available():
        pytest.skip('the CPU setup only applies without CUDA')
    env = dict(
        MASTER_ADDR='127.0.0.1',
        MASTER_PORT=str(_free_port()),
        RANK='0',
        WORLD_SIZE='1',
        LOCAL_RANK='0',
    )
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        try:
            note = setup_cpu_distributed(cfg, 'pytorch')
            assert torch_dist.get_backend() == 'gloo'
            assert note.startswith('no CUDA: distributed backend gloo')
            # what mmengine's Runner.wrap_model does with the wrapper config
            from mmengine.registry import MODEL_WRAPPERS

            model = torch.nn.Sequential(
                torch.nn.Conv2d(3, 4, 1), torch.nn.SyncBatchNorm(4)
            )
            params = list(model.parameters())
            wrapped = MODEL_WRAPPERS.build(
                cfg.model_wrapper_cfg, default_args=dict(module=model)
            )
            assert isinstance(wrapped, CPUDistributedDataParallel)
            assert not any(
                isinstance(m, torch.nn.SyncBatchNorm)
                for m in wrapped.modules()
            )
            # the same parameters, so the optimizer and DDP see one model
            assert all(
                a is b for a, b in zip(params, wrapped.module.parameters())
            )
            wrapped.train()
            wrapped(torch.randn(2, 3, 5, 5)).sum().backward()
        finally:
            if torch_dist.is_initialized():
                torch_dist.destroy_process_group()
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    assert cfg.model_wrapper_cfg.device_ids is None
    assert cfg.model_wrapper_cfg.type.endswith('.CPUDistributedDataParallel')
