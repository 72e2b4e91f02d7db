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
- in a distributed run without CUDA, each process uses at most its share
  of the usable cores (:func:`mmssm.utils.distributed.cap_cpu_threads`).

A config opts out of a hook as of any default hook
(``default_hooks = dict(resume=None)``).
"""

from mmengine.logging import print_log
from mmengine.runner import Runner as _MMEngineRunner

from mmssm.registry import RUNNERS
from mmssm.utils.distributed import cap_cpu_threads, local_world_size


@RUNNERS.register_module()
class Runner(_MMEngineRunner):
    """mmengine's ``Runner`` with mmssm's reliability defaults (see above).

    The arguments are those of mmengine's Runner.
    """

    def setup_env(self, env_cfg: dict) -> None:
        super().setup_env(env_cfg)
        if self.distributed:
            note = cap_cpu_threads(local_world_size())
            if note:
                print_log(note, logger='current')

    def register_hooks(self, default_hooks=None, custom_hooks=None) -> None:
        hooks = dict(default_hooks or {})
        checkpoint = hooks.get('checkpoint', dict(interval=1))
        upstream = isinstance(checkpoint, dict) and checkpoint.get(
            'type', 'CheckpointHook'
        ) in ('CheckpointHook', 'mmengine.CheckpointHook')
        if upstream:
            hooks['checkpoint'] = dict(checkpoint, type='mmssm.CheckpointHook')
        if 'resume' not in hooks:
            hooks['resume'] = dict(type='mmssm.ResumeHook')
        elif hooks['resume'] is None:  # the config opted out
            del hooks['resume']
        super().register_hooks(hooks, custom_hooks)
