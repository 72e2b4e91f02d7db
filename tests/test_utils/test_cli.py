"""mmssm.utils.cli: the steps train.py and test.py share."""

import torch.distributed as torch_dist

from mmssm.utils import cli


def test_end_distributed_leaves_the_process_group(tmp_path):
    torch_dist.init_process_group(
        'gloo',
        init_method=f'file://{tmp_path / "store"}',
        rank=0,
        world_size=1,
    )
    try:
        cli.end_distributed()
        assert not torch_dist.is_initialized()
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    cli.end_distributed()  # not distributed: nothing to do
