# mmssm's runtime for mmseg configs, listed beside the toolbox's own defaults
# in a config's _base_ (['mmseg::_base_/default_runtime.py',
# '../_base_/default_runtime_seg.py', ...]): a fragment, not a chain, so
# that configs keep at most 3 levels of _base_ files.

# mmengine's Runner with mmssm's reliability defaults (mmssm/engine/runner.py):
# checkpoints written whole or not (mmssm.CheckpointHook), exact and fast
# resume (mmssm.ResumeHook), CPU threads capped per distributed process,
# one live training per work dir
runner_type = 'mmssm.Runner'
