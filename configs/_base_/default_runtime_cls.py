# mmssm's runtime for mmpretrain configs: the toolbox's own defaults, plus
# what every mmssm training run needs from the runtime (added here, once).
_base_ = ['mmpretrain::_base_/default_runtime.py']
