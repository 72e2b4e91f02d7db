"""A hook for tests/test_tools/test_train.py: what a resumed run starts from.

Imported by ``custom_imports`` in a training subprocess. Before the first
training iteration (after the Runner has resumed) it saves the iteration
and epoch counters, the model weights and the optimizer state to
``out_file``.
"""

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class ResumeProbeHook(Hook):
    """Save the state a training run starts from.

    Args:
        out_file (str): Where to ``torch.save`` it.
    """

    def __init__(self, out_file: str) -> None:
        self.out_file = out_file

    def before_train(self, runner) -> None:
        model = runner.model
        if is_model_wrapper(model):
            model = model.module
        torch.save(
            dict(
                iter=runner.iter,
                epoch=runner.epoch,
                state_dict=model.state_dict(),
                optimizer=runner.optim_wrapper.state_dict(),
            ),
            self.out_file,
        )
