# mmssm's runtime for mmpretrain configs: the toolbox's own defaults, plus
# what every mmssm training run needs from the runtime (added here, once).
_base_ = ['mmpretrain::_base_/default_runtime.py']

# mmengine's Runner with mmssm's reliability defaults (mmssm/engine/runner.py):
# checkpoints written whole or not (mmssm.CheckpointHook), exact and fast
# resume (mmssm.ResumeHook), CPU threads capped per distributed process
runner_type = 'mmssm.Runner'
