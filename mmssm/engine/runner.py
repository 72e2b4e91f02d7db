"""mmssm's Runner: mmengine's, with the reliability hooks by default.

Our runtime bases (``configs/_base_/default_runtime_*.py``) set
``runner_type = 'mmssm.Runner'``; mmdet's, mmseg's and mmpretrain's own
tools honour ``runner_type`` too. It differs from mmengine's Runner only
in its defaults:

- mmengine's ``CheckpointHook`` becomes :class:`~mmssm.engine.hooks.
  CheckpointHook` (same arguments; checkpoints written whole or not, one
  line when a save fails);
- :class:`~mmssm.engine.hooks.ResumeHook` is added (random states and the
  sampler position in every checkpoint; exact, fast resume);
- :class:`~mmssm.engine.hooks.DyVMAuxLossHook` is added
  (``default_hooks.dyvm_aux_loss``: DyVM's token-ratio and
  direction-ratio losses of a learned-pruning mmssm backbone in the
  model's loss dict, whatever the detector or segmentor; nothing for a
  dense backbone; its loss configs are the entry's fields);
- in a distributed run without CUDA, each process uses at most its share
  of the usable cores (:func:`mmssm.utils.distributed.cap_cpu_threads`);
- one live training per work dir: ``train()`` holds an advisory lock
  (``work_dir/.train.lock``, released by the kernel when the process ends)
  and a second training on the same work dir is refused with one line
  naming the holder;
- every run gets a log folder of its own: two runs started in the same
  second get time stamps one second apart (mmengine's folders are named by
  the second).

A config opts out of a hook as of any default hook
(``default_hooks = dict(resume=None)``).
"""

import contextlib
import os
import os.path as osp
import socket
import sys
import time

from mmengine.dist import broadcast_object_list
from mmengine.logging import print_log
from mmengine.runner import Runner as _MMEngineRunner

from mmssm.errors import UserError
from mmssm.registry import RUNNERS
from mmssm.utils.distributed import cap_cpu_threads, local_world_size
from mmssm.utils.fileio import LockHeld, hold_lock

RESUME = 'mmssm.ResumeHook'
AUX_LOSS = 'mmssm.DyVMAuxLossHook'


@RUNNERS.register_module()
class Runner(_MMEngineRunner):
    """mmengine's ``Runner`` with mmssm's reliability defaults (see above).

    The arguments are those of mmengine's Runner.
    """

    def setup_env(self, env_cfg: dict) -> None:
        super().setup_env(env_cfg)
        self._timestamp = self._own_timestamp(self._timestamp)
        if self.distributed:
            note = cap_cpu_threads(local_world_size())
            if note:
                print_log(note, logger='current')

    def _own_timestamp(self, stamp: str) -> str:
        """The first free time stamp from ``stamp`` on (rank 0 claims it)."""
        unique = [stamp]
        if self.rank == 0:
            os.makedirs(self.work_dir, exist_ok=True)
            when = time.mktime(time.strptime(stamp, '%Y%m%d_%H%M%S'))
            while True:
                try:  # mkdir is atomic: one run gets each folder
                    os.mkdir(osp.join(self.work_dir, unique[0]))
                    break
                except FileExistsError:
                    when += 1
                    unique[0] = time.strftime(
                        '%Y%m%d_%H%M%S', time.localtime(when)
                    )
        if self.distributed:
            broadcast_object_list(unique)
        return unique[0]

    def train(self):
        if self.rank != 0:
            return super().train()
        lock = osp.join(self.work_dir, '.train.lock')
        note = f'process {os.getpid()} on {socket.gethostname()}: ' + (
            ' '.join(sys.argv)
        )
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(hold_lock(lock, note))
            except LockHeld as e:
                raise UserError(
                    f'work dir {self.work_dir!r} is in use by a live '
                    f'training run ({e.holder}); wait for it to end, or '
                    'train into another --work-dir'
                ) from None
            return super().train()

    def register_hooks(self, default_hooks=None, custom_hooks=None) -> None:
        hooks = dict(default_hooks or {})
        checkpoint = hooks.get('checkpoint', dict(interval=1))
        upstream = isinstance(checkpoint, dict) and checkpoint.get(
            'type', 'CheckpointHook'
        ) in ('CheckpointHook', 'mmengine.CheckpointHook')
        if upstream:
            hooks['checkpoint'] = dict(checkpoint, type='mmssm.CheckpointHook')
        resume = hooks.get('resume', {})
        if resume is None:  # the config opted out
            del hooks['resume']
        elif isinstance(resume, dict):  # its arguments may come alone
            hooks['resume'] = dict(resume, type=resume.get('type', RESUME))
        # DyVM's ratio losses in any detector's or segmentor's loss dict
        aux = hooks.get('dyvm_aux_loss', {})
        if aux is None:
            del hooks['dyvm_aux_loss']
        elif isinstance(aux, dict):
            hooks['dyvm_aux_loss'] = dict(aux, type=aux.get('type', AUX_LOSS))
        super().register_hooks(hooks, custom_hooks)
