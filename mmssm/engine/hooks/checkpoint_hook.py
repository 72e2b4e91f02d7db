"""mmengine's CheckpointHook, saving whole checkpoints or none.

mmengine writes a checkpoint straight onto its final path, removes the
oldest checkpoint (``max_keep_ckpts``) before the new one is written and
writes ``last_checkpoint`` with a plain ``open``: a full disk leaves a
partial ``iter_N.pth`` and an ``OSError`` traceback, and can leave no
complete checkpoint at all. :class:`CheckpointHook` is the same hook with
mmssm's atomic file backend (:mod:`mmssm.utils.fileio`) as its default
``backend_args``, old checkpoints removed only after the new one is
complete, ``last_checkpoint`` rewritten atomically, and a failed save ended
by one line naming the file, the cause and the checkpoint to resume from.
"""

import os.path as osp
from collections import deque
from typing import Optional

from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook as _MMEngineCheckpointHook

from mmssm.errors import UserError
from mmssm.registry import HOOKS
from mmssm.utils.fileio import (
    ATOMIC_BACKEND_ARGS,
    atomic_write,
    describe_os_error,
)


class CheckpointSaveError(UserError):
    """A checkpoint could not be written (full disk, no permission...)."""


@HOOKS.register_module()
class CheckpointHook(_MMEngineCheckpointHook):
    """mmengine's ``CheckpointHook``; a checkpoint is written whole or not.

    The arguments are those of mmengine's hook. Without ``backend_args``
    (and ``file_client_args``), a local ``out_dir`` is written through
    ``backend_args=dict(backend='mmssm_atomic')``: a temporary file beside
    the checkpoint, renamed when complete. With ``max_keep_ckpts``, the
    oldest checkpoint is removed after the new one is complete (mmengine
    removes it first). ``last_checkpoint`` names a complete file only.

    Raises:
        CheckpointSaveError: When a save fails: one line with the file, the
            cause (e.g. no space left on device) and the last complete
            checkpoint, from which ``--resume`` continues.
    """

    def __init__(self, *args, backend_args: Optional[dict] = None, **kwargs):
        out_dir = kwargs.get('out_dir')
        local = out_dir is None or '://' not in str(out_dir)
        if (
            backend_args is None
            and local
            and not kwargs.get('file_client_args')
        ):
            backend_args = dict(ATOMIC_BACKEND_ARGS)
        super().__init__(*args, backend_args=backend_args, **kwargs)

    def before_train(self, runner) -> None:
        super().before_train(runner)
        if self.max_keep_ckpts > 0:  # no maxlen: removal is ours, below
            self.keep_ckpt_ids = deque(self.keep_ckpt_ids)

    def _save_checkpoint_with_step(self, runner, step, meta) -> None:
        previous = self.last_ckpt
        path = self.file_backend.join_path(
            self.out_dir, self.filename_tmpl.format(step)
        )
        keep, self.max_keep_ckpts = self.max_keep_ckpts, -1
        try:
            super()._save_checkpoint_with_step(runner, step, meta)
        except OSError as e:
            complete = path if osp.isfile(path) else previous
            self._failed(runner, path, e, complete)
        finally:
            self.max_keep_ckpts = keep
        if is_main_process():  # mmengine wrote it with open('w'): again
            atomic_write(osp.join(runner.work_dir, 'last_checkpoint'), path)
        self._remove_old(runner, step)

    def _failed(self, runner, path, error, complete) -> None:
        """Point everything at ``complete`` again and raise one line."""
        self.last_ckpt = complete
        runner.message_hub.update_info('last_ckpt', complete)
        last = osp.join(runner.work_dir, 'last_checkpoint')
        if complete is not None:
            try:
                atomic_write(last, complete)
            except OSError:
                pass  # the disk is full: train.py --resume checks the file
            advice = (
                f'the last complete checkpoint is {complete!r} '
                '(free space, then train again with --resume)'
            )
        else:
            advice = 'no checkpoint of this run is complete'
        raise CheckpointSaveError(
            f'cannot save checkpoint {path!r}: '
            f'{describe_os_error(error)}; {advice}'
        ) from None

    def _remove_old(self, runner, step) -> None:
        """Keep the newest ``max_keep_ckpts`` checkpoints, once complete."""
        if self.max_keep_ckpts <= 0:
            return
        if not self.keep_ckpt_ids or self.keep_ckpt_ids[-1] != step:
            self.keep_ckpt_ids.append(step)
        while len(self.keep_ckpt_ids) > self.max_keep_ckpts:
            old = self.file_backend.join_path(
                self.out_dir,
                self.filename_tmpl.format(self.keep_ckpt_ids.popleft()),
            )
            if not is_main_process():
                continue
            if self.file_backend.isfile(old):
                self.file_backend.remove(old)
            elif self.file_backend.isdir(old):  # deepspeed's are folders
                self.file_backend.rmtree(old)
        runner.message_hub.update_info(
            'keep_ckpt_ids', list(self.keep_ckpt_ids)
        )
