# mmssm's runtime for mmseg configs: the toolbox's own defaults, plus
# what every mmssm training run needs from the runtime (added here, once).
_base_ = ['mmseg::_base_/default_runtime.py']
